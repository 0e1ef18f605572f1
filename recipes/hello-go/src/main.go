// hello-go: a static web server that greets, built by pkg.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"runtime"
)

func greeting() string {
	return fmt.Sprintf("Hello from Go on %s/%s!", runtime.GOOS, runtime.GOARCH)
}

func main() {
	listen := flag.String("listen", ":8080", "address to serve on")
	once := flag.Bool("once", false, "print the greeting and exit")
	flag.Parse()
	if *once {
		fmt.Println(greeting())
		return
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, greeting())
	})
	log.Printf("serving on %s", *listen)
	log.Fatal(http.ListenAndServe(*listen, nil))
}
