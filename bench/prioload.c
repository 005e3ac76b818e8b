/*
 * prioload.c - open-loop Poisson HTTP/1.1 load with a class mix and per-request records.
 *
 * The load generator of bench/priority.py.  Like bench/loadgen.c it measures
 * free of coordinated omission (latency counts from each request's INTENDED
 * send time), but:
 *
 *   - arrivals are Poisson (exponential gaps, seeded), not evenly spaced;
 *   - each request has a class, drawn with probability --critical for
 *     "critical", else "batch", and carries `x-meshlayer-priority: <class>`;
 *   - with --ids every request carries `x-bench-id: <index>` (the call-graph
 *     case uses it to tie a backend's work to its parent request);
 *   - a request has a client timeout (--timeout): one not answered within it
 *     (counted from its intended send time) is given up, its connection closed
 *     and replaced, as a real client with a deadline does; one still waiting
 *     for a free connection when its time is up is never sent;
 *   - connections are opened without blocking and up to --conns of them are
 *     used, one request outstanding on each;
 *   - every request's outcome is written to --records as one line
 *     "class status latency_us" (class 0 = critical, 1 = batch; status the HTTP
 *     status, 0 = timed out, -1 = connection failed, -2 = never completed).
 *
 * Bounded: at most rate*duration*2+64 requests (Poisson), and it exits
 * duration + drain seconds after the start at the latest (drain defaults to
 * the timeout).  A JSON summary with diagnostics goes to stdout.
 *
 * Build:  gcc -O2 -o prioload prioload.c -lm
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "loadcommon.h"

#define MAX_CONNS 8192
#define MAX_REQUESTS 5000000ULL
#define BUF_SIZE 16384
#define ST_TIMEOUT 0
#define ST_CONNFAIL (-1)
#define ST_NONE (-2)

enum { C_DEAD, C_CONNECTING, C_FREE, C_BUSY };

typedef struct {
    int fd;
    int state;
    uint64_t req;
    size_t len;
    char buf[BUF_SIZE];
} conn_t;

static struct sockaddr_in g_addr;
static conn_t *g_conns;
static int g_nconns;
static int g_epfd;
static int *g_free; /* stack of free connection indices */
static int g_nfree;

static char g_head[2][512]; /* request head per class, up to the blank line */
static size_t g_headlen[2];
static int g_ids;

static uint64_t g_total, g_next, g_sent, g_completed, g_timeouts, g_connfails;
static uint64_t g_reconnects, g_conn_waits, g_wait_hi, g_never_sent;
static uint64_t g_t0, g_timeout_ns;
static uint64_t *g_when;  /* intended send time, ns after g_t0 */
static uint8_t *g_cls;
static int16_t *g_status;
static int64_t *g_lat_ns;
static int64_t *g_lag_ns;

static uint64_t intended(uint64_t i) { return g_t0 + g_when[i]; }

/* xorshift64*: small, seeded, good enough for arrival gaps and class draws */
static uint64_t g_rng = 88172645463325252ULL;
static double urand(void) {
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (double)((g_rng * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0);
}

static void finish(uint64_t i, int status, uint64_t now) {
    if (g_status[i] != ST_NONE) return;
    g_status[i] = (int16_t)status;
    uint64_t t = intended(i);
    g_lat_ns[i] = (int64_t)(now > t ? now - t : 0);
    if (status == ST_TIMEOUT) g_timeouts++;
    else if (status == ST_CONNFAIL) g_connfails++;
    else g_completed++;
}

static void start_conn(int idx) {
    conn_t *c = &g_conns[idx];
    c->state = C_DEAD;
    c->len = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr);
    if (r < 0 && errno != EINPROGRESS) {
        close(fd);
        return;
    }
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        close(fd);
        c->fd = -1;
        return;
    }
    c->state = C_CONNECTING;
}

static void make_free(int idx) {
    g_conns[idx].state = C_FREE;
    g_free[g_nfree++] = idx;
}

/* Drop a connection and start a new one; a request on it ends with `status`. */
static void recycle(int idx, uint64_t now, int status) {
    conn_t *c = &g_conns[idx];
    if (c->state == C_BUSY) finish(c->req, status, now);
    if (c->state == C_FREE) {
        for (int k = 0; k < g_nfree; k++)
            if (g_free[k] == idx) {
                g_free[k] = g_free[--g_nfree];
                break;
            }
    }
    if (c->fd >= 0) {
        epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    g_reconnects++;
    start_conn(idx);
}

static void on_connected(int idx, uint64_t now) {
    conn_t *c = &g_conns[idx];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
        recycle(idx, now, ST_CONNFAIL);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
    epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
    make_free(idx);
}

static uint64_t due_count(uint64_t now) {
    /* g_when is sorted: binary search for the first request not yet due */
    uint64_t lo = g_next, hi = g_total;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (intended(mid) <= now) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void dispatch(uint64_t now) {
    uint64_t due = due_count(now);
    char buf[1024];
    while (g_next < due) {
        if (intended(g_next) + g_timeout_ns <= now) {
            /* waited for a connection past its deadline: the client gave up */
            finish(g_next, ST_TIMEOUT, now);
            g_never_sent++;
            g_next++;
            continue;
        }
        if (g_nfree == 0) break;
        int idx = g_free[--g_nfree];
        conn_t *c = &g_conns[idx];
        int k = g_cls[g_next];
        const char *req = g_head[k];
        size_t len = g_headlen[k];
        if (g_ids) {
            int n = snprintf(buf, sizeof buf, "%.*sx-bench-id: %llu\r\n\r\n", (int)(len - 2), req,
                             (unsigned long long)g_next);
            req = buf;
            len = (size_t)n;
        }
        ssize_t n = write(c->fd, req, len);
        if (n != (ssize_t)len) {
            c->state = C_DEAD; /* not busy: the request stays queued */
            recycle(idx, now, ST_CONNFAIL);
            continue;
        }
        c->state = C_BUSY;
        c->req = g_next;
        c->len = 0;
        g_lag_ns[g_sent++] = (int64_t)(now - intended(g_next));
        g_next++;
    }
    if (g_next < due) {
        uint64_t from = g_next > g_wait_hi ? g_next : g_wait_hi;
        if (due > from) g_conn_waits += due - from;
        if (due > g_wait_hi) g_wait_hi = due;
    }
}

/* Give up requests outstanding past their deadline (scanned every few ms). */
static void expire(uint64_t now) {
    for (int i = 0; i < g_nconns; i++) {
        conn_t *c = &g_conns[i];
        if (c->state == C_BUSY && intended(c->req) + g_timeout_ns <= now)
            recycle(i, now, ST_TIMEOUT);
    }
}

static void arm_timer(int tfd, uint64_t now) {
    uint64_t want = 0;
    if (g_next < g_total) {
        want = intended(g_next);
        if (want <= now) want = g_nfree > 0 ? now + 1000 : 0;
    }
    arm_at(tfd, want);
}

/* 1 = whole response in buf, 0 = need more, -1 = malformed; sets status/close_after. */
static int parse_response(conn_t *c, int eof, int *status, int *close_after) {
    return parse_response_buf(c->buf, c->len, BUF_SIZE, eof, status, close_after);
}

static void on_event(int idx, uint32_t events, uint64_t now) {
    conn_t *c = &g_conns[idx];
    if (c->state == C_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(idx, now);
        return;
    }
    if (c->state == C_DEAD) return;
    int eof = 0;
    for (;;) {
        if (c->len >= BUF_SIZE) break;
        ssize_t n = read(c->fd, c->buf + c->len, BUF_SIZE - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            int st, ca;
            if (c->state == C_BUSY && parse_response(c, 0, &st, &ca) != 0) break;
            continue;
        }
        if (n == 0) eof = 1;
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) eof = 1;
        break;
    }
    if (c->state != C_BUSY) {
        if (eof || c->len) recycle(idx, now, ST_CONNFAIL);
        return;
    }
    int status = 0, close_after = 0;
    int r = parse_response(c, eof, &status, &close_after);
    if (r == 0 && !eof) return;
    if (r <= 0) {
        recycle(idx, now, ST_CONNFAIL);
        return;
    }
    finish(c->req, status, now);
    c->state = C_DEAD;
    c->len = 0;
    if (close_after || eof) recycle(idx, now, ST_CONNFAIL);
    else make_free(idx);
}

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s --port PORT --rate R --duration S [--host IPV4] [--authority NAME]\n"
            "       [--path PATH] [--conns N] [--critical SHARE] [--timeout S] [--drain S]\n"
            "       [--seed N] [--records FILE] [--ids]\n",
            prog);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *authority = "app", *path = "/", *records = NULL;
    int port = 0;
    double rate = 0, duration = 0, critical = 0.2, timeout = 2.0, drain = -1;
    unsigned long long seed = 1;
    g_nconns = 1000;
    static struct option opts[] = {
        {"host", required_argument, 0, 'h'},     {"port", required_argument, 0, 'p'},
        {"authority", required_argument, 0, 'a'}, {"path", required_argument, 0, 'P'},
        {"rate", required_argument, 0, 'r'},     {"duration", required_argument, 0, 'd'},
        {"conns", required_argument, 0, 'c'},    {"critical", required_argument, 0, 'k'},
        {"timeout", required_argument, 0, 't'},  {"drain", required_argument, 0, 'D'},
        {"seed", required_argument, 0, 's'},     {"records", required_argument, 0, 'R'},
        {"ids", no_argument, 0, 'i'},            {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'a': authority = optarg; break;
        case 'P': path = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'c': g_nconns = atoi(optarg); break;
        case 'k': critical = atof(optarg); break;
        case 't': timeout = atof(optarg); break;
        case 'D': drain = atof(optarg); break;
        case 's': seed = strtoull(optarg, NULL, 10); break;
        case 'R': records = optarg; break;
        case 'i': g_ids = 1; break;
        default: usage(argv[0]); return 2;
        }
    }
    if (drain < 0) drain = timeout;
    if (port <= 0 || port > 65535 || rate <= 0 || duration <= 0 || g_nconns < 1 ||
        g_nconns > MAX_CONNS || critical < 0 || critical > 1 || timeout <= 0) {
        usage(argv[0]);
        return 2;
    }
    double cap_d = rate * duration * 2 + 64;
    if (cap_d > (double)MAX_REQUESTS) {
        fprintf(stderr, "rate*duration too large\n");
        return 2;
    }
    uint64_t cap = (uint64_t)cap_d;
    g_timeout_ns = (uint64_t)(timeout * 1e9);
    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &g_addr.sin_addr) != 1) {
        fprintf(stderr, "--host must be an IPv4 address\n");
        return 2;
    }
    const char *names[2] = {"critical", "batch"};
    for (int k = 0; k < 2; k++) {
        int n = snprintf(g_head[k], sizeof g_head[k],
                         "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: prioload\r\n"
                         "x-meshlayer-priority: %s\r\n\r\n",
                         path, authority, names[k]);
        if (n <= 0 || (size_t)n >= sizeof g_head[k]) return 2;
        g_headlen[k] = (size_t)n;
    }

    g_when = malloc(sizeof(uint64_t) * cap);
    g_cls = malloc(cap);
    g_status = malloc(sizeof(int16_t) * cap);
    g_lat_ns = malloc(sizeof(int64_t) * cap);
    g_lag_ns = malloc(sizeof(int64_t) * cap);
    g_conns = calloc((size_t)g_nconns, sizeof(conn_t));
    g_free = calloc((size_t)g_nconns, sizeof(int));
    if (!g_when || !g_cls || !g_status || !g_lat_ns || !g_lag_ns || !g_conns || !g_free) return 3;

    /* the schedule: Poisson arrivals within [0, duration), classes drawn independently */
    g_rng ^= seed * 0x9E3779B97F4A7C15ULL;
    if (g_rng == 0) g_rng = 1;
    double t = 0, horizon = duration * 1e9;
    for (;;) {
        double u = urand();
        t += -log(1.0 - u) * 1e9 / rate;
        if (t >= horizon || g_total >= cap) break;
        g_when[g_total] = (uint64_t)t;
        g_cls[g_total] = urand() < critical ? 0 : 1;
        g_status[g_total] = ST_NONE;
        g_lat_ns[g_total] = -1;
        g_total++;
    }

    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    g_epfd = epoll_create1(0);
    for (int i = 0; i < g_nconns; i++) {
        g_conns[i].fd = -1;
        start_conn(i);
        if (g_conns[i].state == C_DEAD) {
            fprintf(stderr, "connect to %s:%d failed: %s\n", host, port, strerror(errno));
            return 1;
        }
    }
    /* wait (bounded) until the connections are up before the clock starts */
    uint64_t setup_end = now_ns() + 5000000000ULL;
    struct epoll_event evs[512];
    g_t0 = UINT64_MAX / 4;
    while (g_nfree < g_nconns && now_ns() < setup_end) {
        int ne = epoll_wait(g_epfd, evs, 512, 10);
        uint64_t now = now_ns();
        for (int k = 0; k < ne; k++) on_event((int)evs[k].data.u32, evs[k].events, now);
    }
    if (g_nfree == 0) {
        fprintf(stderr, "no connection to %s:%d could be opened\n", host, port);
        return 1;
    }
    int tfd = add_timer(g_epfd);

    g_t0 = now_ns() + 1000000ULL;
    uint64_t send_end = g_t0 + (uint64_t)(duration * 1e9);
    uint64_t deadline = send_end + (uint64_t)(drain * 1e9);
    uint64_t next_expire = 0;
    arm_timer(tfd, now_ns());
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline) break;
        if (g_next >= g_total) {
            int busy = 0;
            for (int i = 0; i < g_nconns && !busy; i++) busy = g_conns[i].state == C_BUSY;
            if (!busy) break;
        }
        int ne = epoll_wait(g_epfd, evs, 512, 5);
        if (ne < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        now = now_ns();
        for (int k = 0; k < ne; k++) {
            uint32_t id = evs[k].data.u32;
            if (id == UINT32_MAX) {
                g_armed = UINT64_MAX;
                continue;
            }
            on_event((int)id, evs[k].events, now);
        }
        if (now >= next_expire) {
            expire(now);
            next_expire = now + 2000000ULL;
        }
        dispatch(now);
        arm_timer(tfd, now);
    }

    uint64_t end = now_ns();
    unsigned long long run_ns, wait_ns;
    sched_times(&run_ns, &wait_ns);
    uint64_t incomplete = 0;
    for (uint64_t i = 0; i < g_total; i++) {
        if (g_status[i] == ST_NONE) {
            incomplete++;
            uint64_t it = intended(i);
            g_lat_ns[i] = (int64_t)(end > it ? end - it : 0);
        }
    }
    if (records) {
        FILE *f = fopen(records, "w");
        if (!f) {
            perror(records);
            return 1;
        }
        for (uint64_t i = 0; i < g_total; i++)
            fprintf(f, "%d %d %lld\n", g_cls[i], g_status[i], (long long)(g_lat_ns[i] / 1000));
        fclose(f);
    }
    qsort(g_lag_ns, g_sent, sizeof(int64_t), cmp_i64);
    typedef unsigned long long ull;
    printf("{\"rate\": %.1f, \"duration\": %.3f, \"connections\": %d, \"timeout\": %.3f, "
           "\"intended\": %llu, \"sent\": %llu, \"completed\": %llu, \"timeouts\": %llu, "
           "\"never_sent\": %llu, \"connfails\": %llu, \"incomplete\": %llu, "
           "\"reconnects\": %llu, \"conn_waits\": %llu, ",
           rate, duration, g_nconns, timeout, (ull)g_total, (ull)g_sent, (ull)g_completed,
           (ull)g_timeouts, (ull)g_never_sent, (ull)g_connfails, (ull)incomplete,
           (ull)g_reconnects, (ull)g_conn_waits);
    printf("\"send_lag_p50_us\": %.1f, \"send_lag_p99_us\": %.1f, \"elapsed_s\": %.3f, "
           "\"cpu_ms\": %.1f, \"runqueue_wait_ms\": %.1f}\n",
           pct(g_lag_ns, g_sent, 0.50), pct(g_lag_ns, g_sent, 0.99),
           (double)(end - g_t0) / 1e9, (double)run_ns / 1e6, (double)wait_ns / 1e6);
    return 0;
}
