/*
 * Reference peer for scripts/bench_backlog.sh: the simplest C programs the connection-flood
 * benchmark compares netprobe against (loopback only).
 *
 *   connect_loop connect HOST PORT COUNT   blocking connect()/close() COUNT times; prints
 *                                          "connects N established E seconds S rate R"
 *   connect_loop serve PORT [keep]         listen(4096) on 127.0.0.1:PORT and accept forever,
 *                                          closing each connection at once, or keeping it
 *                                          open with "keep" (for the held-connections test;
 *                                          4 processes share the listener to hold more fds)
 *
 * Closes use SO_LINGER {1, 0} (RST, no TIME_WAIT), as netprobe's connector does, so both
 * sides of the comparison reuse ephemeral ports the same way.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int run_connect(const char *host, int port, long count) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "connect_loop: bad IPv4 address %s\n", host);
        return 2;
    }
    struct linger lin = {1, 0};
    long ok = 0;
    double start = now_s();
    for (long i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
            ok++;
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
        close(fd);
    }
    double took = now_s() - start;
    printf("connects %ld established %ld seconds %.3f rate %.0f\n", count, ok, took,
           took > 0 ? (double)count / took : 0.0);
    return ok == count ? 0 : 1;
}

static int run_serve(int port, int keep) {
    /* A process group of our own (pgid = our pid), so "kill -- -PID" also ends the
     * helpers forked below; fails harmlessly when we already lead a group. */
    setsid();
    if (keep) {
        /* Holding tens of thousands of connections needs as many descriptors. */
        struct rlimit rl = {200000, 200000};
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            perror("setrlimit (continuing with the current limit)");
    }
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 4096) != 0) {
        perror("bind/listen");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &len);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    if (keep) {
        /* Where the hard fd limit cannot be raised (no CAP_SYS_RESOURCE), several processes
         * accepting on the one listener each keep up to their own limit. They die with the
         * parent's process group (the benchmark kills them all). */
        for (int i = 0; i < 3; i++)
            if (fork() == 0)
                break;
    }
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                usleep(1000); /* the connection stays queued: back off (SOCKETS.md 6) */
            continue;
        }
        if (!keep)
            close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc >= 5 && strcmp(argv[1], "connect") == 0)
        return run_connect(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc >= 3 && strcmp(argv[1], "serve") == 0)
        return run_serve(atoi(argv[2]), argc >= 4 && strcmp(argv[3], "keep") == 0);
    fprintf(stderr, "usage: connect_loop connect HOST PORT COUNT | connect_loop serve PORT [keep]\n");
    return 2;
}
