/* Linked into C and C++ programs with -Wl,--wrap=main: the C runtime calls this instead of the
 * program's main, which it calls in turn. Only when that main returns (the tests ran to their end)
 * is the completion marker named by $MCODE_SANDBOX_COMPLETION_FILE created; an exit(0) or _exit(0)
 * before that never comes back here, so the sandbox does not count it as a pass
 * (data_tools/sandbox/completion.py). Compiles as C and as C++. */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

int __real_main(int argc, char **argv, char **envp);

int __wrap_main(int argc, char **argv, char **envp) {
    /* Read before main: the program may change its environment. */
    const char *marker = getenv("MCODE_SANDBOX_COMPLETION_FILE");
    int status = __real_main(argc, argv, envp);
    if (marker != NULL) {
        int fd = open(marker, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd >= 0) {
            close(fd);
        }
    }
    return status;
}

#ifdef __cplusplus
}
#endif
