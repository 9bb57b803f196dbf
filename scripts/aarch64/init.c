/* init of the aarch64 test VM: mounts the pseudo file systems, runs /test with the
 * arguments listed in /args (one per line) and the environment in /env, prints its exit
 * status as "MU2_EXIT=<n>" and powers the machine off. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int read_lines(const char *path, char **out, int max, char *buf, size_t cap) {
    FILE *f = fopen(path, "r");
    int n = 0;
    if (!f) return 0;
    size_t len = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[len] = 0;
    char *p = buf;
    while (*p && n < max) {
        char *nl = strchr(p, '\n');
        if (nl) *nl = 0;
        out[n++] = p;
        if (!nl) break;
        p = nl + 1;
    }
    return n;
}

int main(void) {
    static char abuf[65536], ebuf[65536];
    char *argv[512], *envp[256];
    mkdir("/dev", 0755);
    mkdir("/proc", 0755);
    mkdir("/sys", 0755);
    mkdir("/tmp", 01777);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
    mkdir("/dev/shm", 01777);
    mount("tmpfs", "/dev/shm", "tmpfs", 0, NULL);
    argv[0] = "/test";
    int argc = 1 + read_lines("/args", argv + 1, 510, abuf, sizeof abuf);
    argv[argc] = NULL;
    int envc = read_lines("/env", envp, 255, ebuf, sizeof ebuf);
    envp[envc] = NULL;
    int code = 120;
    pid_t pid = fork();
    if (pid == 0) {
        chdir("/tmp");
        execve("/test", argv, envp);
        fprintf(stderr, "init: exec /test: %s\n", strerror(errno));
        _exit(127);
    } else if (pid > 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    fflush(stdout);
    printf("\nMU2_EXIT=%d\n", code);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
