/* Linked into C and C++ programs with -Wl,--wrap=__assert_fail: a failed assert() exits with 117
 * (test failed) instead of calling abort(), whose SIGABRT would look like any other crash
 * (double free, uncaught C++ exception). Compiles as C and as C++. */
#include <stdio.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C"
#endif
void __wrap___assert_fail(const char *expression, const char *file, unsigned int line, const char *function) {
    fflush(stdout);
    fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, expression);
    fflush(stderr);
    _exit(117);
}
