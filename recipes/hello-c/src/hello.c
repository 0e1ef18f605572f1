/* hello-c: a static greeting that names the architecture it was built for. */
#include <stdio.h>

#if defined(__aarch64__)
#define ARCH "arm64"
#elif defined(__x86_64__)
#define ARCH "amd64"
#else
#define ARCH "unknown"
#endif

int main(void) {
    printf("Hello from C on linux/%s!\n", ARCH);
    return 0;
}
