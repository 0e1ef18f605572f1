//! Unit tests of the sandbox plan with a recording Syscall double.
