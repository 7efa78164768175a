/* Load generator for scripts/bench_echo.py: drives any TCP echo server on loopback and checks
 * every echoed byte. Written in C so the client is never the bottleneck being measured.
 *
 *   bench_echo_client bulk     HOST PORT BYTES            -> "bytes seconds"
 *   bench_echo_client pingpong HOST PORT SIZE SECONDS     -> "messages seconds"
 *   bench_echo_client multi    HOST PORT CONNS SIZE SECONDS -> "messages seconds"
 *   bench_echo_client idle     HOST PORT CONNS            -> prints "ready N", holds the
 *                                 connections until stdin closes, then resets them
 *
 * Exit status: 0 ok, 1 echoed bytes differ or the server closed early, 2 usage/system error,
 * 3 no progress for 3 s (the server stalled).
 * Build: gcc -O2 -pthread -o bench_echo_client bench_echo_client.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define PATTERN_SIZE (1u << 20) /* the payload repeats every 1 MiB */
#define CHUNK (256u * 1024u)

static unsigned char pattern[PATTERN_SIZE + CHUNK];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void fill_pattern(uint32_t seed) {
    /* xorshift: not compressible, not periodic inside a chunk; the tail mirrors the head so
     * any window of CHUNK bytes starting below PATTERN_SIZE is contiguous. */
    uint32_t x = seed ? seed : 2463534242u;
    for (size_t i = 0; i < PATTERN_SIZE; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pattern[i] = (unsigned char)x;
    }
    memcpy(pattern + PATTERN_SIZE, pattern, CHUNK);
}

static int connect_to(const char *host, int port, int nonblock) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad host %s (IPv4 literal)\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    if (nonblock) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* One connection: a sender thread writes BYTES of the pattern while this thread reads them
 * back and compares them as they come. Two threads, as iperf3 has two processes: one thread
 * doing both copies would be the bottleneck of a fast server. */
struct bulk_job {
    int fd;
    long long total;
    int failed;
};

static void *bulk_sender(void *arg) {
    struct bulk_job *job = arg;
    long long sent = 0;
    while (sent < job->total) {
        size_t off = (size_t)(sent % PATTERN_SIZE);
        size_t want = CHUNK;
        if ((long long)want > job->total - sent) want = (size_t)(job->total - sent);
        ssize_t n = send(job->fd, pattern + off, want, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            job->failed = errno;
            break;
        }
        sent += n;
    }
    /* No shutdown(SHUT_WR) at the end: ncat --exec drops the data still in flight when it sees
     * a half-close, and the reader knows how much to expect anyway. */
    return NULL;
}

static int bulk(const char *host, int port, long long total) {
    int fd = connect_to(host, port, 0);
    struct timeval tv = {3, 0}; /* no progress for 3 s: the server stalled */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    static unsigned char buf[CHUNK];
    struct bulk_job job = {fd, total, 0};
    pthread_t sender;
    double t0 = now();
    if (pthread_create(&sender, NULL, bulk_sender, &job) != 0) die("pthread_create");
    long long got = 0;
    int status = 0;
    while (got < total) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n == 0) {
            fprintf(stderr, "bulk: EOF after %lld of %lld bytes back\n", got, total);
            status = 1;
            break;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                fprintf(stderr, "bulk: stalled after %lld of %lld bytes back\n", got, total);
                status = 3;
                break;
            }
            die("recv");
        }
        size_t off = (size_t)(got % PATTERN_SIZE);
        if (memcmp(buf, pattern + off, (size_t)n) != 0) {
            fprintf(stderr, "bulk: echoed bytes differ near offset %lld\n", got);
            status = 1;
            break;
        }
        got += n;
    }
    double dt = now() - t0;
    if (status != 0) shutdown(fd, SHUT_RDWR); /* unblock the sender */
    pthread_join(sender, NULL);
    close(fd);
    if (status == 0 && job.failed) {
        fprintf(stderr, "bulk: send failed: %s\n", strerror(job.failed));
        status = 2;
    }
    if (status == 0) printf("%lld %.6f\n", got, dt);
    return status;
}

static int read_exact(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, 0);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* One connection, one message in flight: round trips per second. */
static int pingpong(const char *host, int port, size_t size, double seconds) {
    int fd = connect_to(host, port, 0);
    unsigned char *buf = malloc(size);
    long long msgs = 0;
    double t0 = now(), end = t0 + seconds;
    size_t off = 0;
    while (1) {
        if ((msgs & 63) == 0 && now() >= end) break;
        if (send(fd, pattern + off, size, MSG_NOSIGNAL) != (ssize_t)size) die("send");
        if (read_exact(fd, buf, size) < 0) {
            fprintf(stderr, "pingpong: server closed after %lld messages\n", msgs);
            return 1;
        }
        if (memcmp(buf, pattern + off, size) != 0) {
            fprintf(stderr, "pingpong: echoed bytes differ in message %lld\n", msgs);
            return 1;
        }
        off = (off + 4099) % PATTERN_SIZE;
        msgs++;
    }
    printf("%lld %.6f\n", msgs, now() - t0);
    close(fd);
    return 0;
}

struct conn {
    int fd;
    size_t off; /* pattern offset of the message in flight */
    size_t got;
};

/* CONNS connections on one epoll, each with one message in flight: aggregate messages/s. */
static int multi(const char *host, int port, int nconns, size_t size, double seconds) {
    raise_nofile();
    int ep = epoll_create1(0);
    struct conn *cs = calloc((size_t)nconns, sizeof *cs);
    unsigned char *buf = malloc(size);
    for (int i = 0; i < nconns; i++) {
        cs[i].fd = connect_to(host, port, 1);
        cs[i].off = ((size_t)i * 7919) % PATTERN_SIZE;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) die("epoll_ctl");
    }
    long long msgs = 0;
    double t0 = now(), end = t0 + seconds;
    for (int i = 0; i < nconns; i++)
        if (send(cs[i].fd, pattern + cs[i].off, size, MSG_NOSIGNAL) != (ssize_t)size) die("send");
    struct epoll_event evs[256];
    while (now() < end) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (n == 0) {
            fprintf(stderr, "multi: no progress for 1 s\n");
            return 1;
        }
        for (int k = 0; k < n; k++) {
            struct conn *c = &cs[evs[k].data.u32];
            ssize_t r = recv(c->fd, buf + c->got, size - c->got, 0);
            if (r == 0) {
                fprintf(stderr, "multi: server closed a connection\n");
                return 1;
            }
            if (r < 0) {
                if (errno == EAGAIN) continue;
                die("recv");
            }
            if (memcmp(buf + c->got, pattern + c->off + c->got, (size_t)r) != 0) {
                fprintf(stderr, "multi: echoed bytes differ\n");
                return 1;
            }
            c->got += (size_t)r;
            if (c->got == size) {
                msgs++;
                c->got = 0;
                c->off = (c->off + 4099) % PATTERN_SIZE;
                if (send(c->fd, pattern + c->off, size, MSG_NOSIGNAL) != (ssize_t)size) die("send");
            }
        }
    }
    printf("%lld %.6f\n", msgs, now() - t0);
    for (int i = 0; i < nconns; i++) close(cs[i].fd);
    return 0;
}

/* Open CONNS idle connections, say so, hold them until stdin closes, then reset them (RST
 * leaves no TIME_WAIT, so repeated runs do not exhaust loopback ports). */
static int idle(const char *host, int port, int nconns) {
    raise_nofile();
    int *fds = calloc((size_t)nconns, sizeof *fds);
    for (int i = 0; i < nconns; i++) fds[i] = connect_to(host, port, 0);
    /* Make sure the server has accepted all of them: one echo round trip on the last one. */
    unsigned char b = 'x';
    if (send(fds[nconns - 1], &b, 1, 0) != 1 || read_exact(fds[nconns - 1], &b, 1) < 0) {
        fprintf(stderr, "idle: last connection got no echo\n");
        return 1;
    }
    printf("ready %d\n", nconns);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) != NULL) {
    }
    struct linger lg = {1, 0};
    for (int i = 0; i < nconns; i++) {
        setsockopt(fds[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(fds[i]);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s bulk|pingpong|multi|idle HOST PORT ...\n", argv[0]);
        return 2;
    }
    fill_pattern(12345);
    const char *mode = argv[1], *host = argv[2];
    int port = atoi(argv[3]);
    if (!strcmp(mode, "bulk") && argc == 5) return bulk(host, port, atoll(argv[4]));
    if (!strcmp(mode, "pingpong") && argc == 6)
        return pingpong(host, port, (size_t)atol(argv[4]), atof(argv[5]));
    if (!strcmp(mode, "multi") && argc == 7)
        return multi(host, port, atoi(argv[4]), (size_t)atol(argv[5]), atof(argv[6]));
    if (!strcmp(mode, "idle") && argc == 5) return idle(host, port, atoi(argv[4]));
    fprintf(stderr, "bad arguments for %s\n", mode);
    return 2;
}
