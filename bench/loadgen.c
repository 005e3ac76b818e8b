/*
 * loadgen.c - a small open-loop HTTP/1.1 load generator (constant rate).
 *
 * Request i is INTENDED to be sent at t0 + i/rate.  Each request goes out on a
 * free keep-alive connection (one outstanding request per connection); if no
 * connection is free the request waits in a backlog, and its latency still
 * counts from its intended send time.  Latency is therefore measured free of
 * coordinated omission: a stalled proxy shows up as latency, not as a lower
 * request rate.
 *
 * Requests still unanswered when the drain deadline passes are counted as
 * "incomplete" and enter the percentiles with the lower bound
 * (deadline - intended); they are also counted as errors.
 *
 * Build:  gcc -O2 -o loadgen loadgen.c
 * Usage:  loadgen HOST PORT HOSTHEADER RATE DURATION_S [CONNS] [DRAIN_S]
 * Output: one JSON object on stdout; latencies in microseconds.  Diagnostics:
 * send_lag_* (actual minus intended send time), conn_waits (requests that found
 * every connection busy), cpu_ms and runqueue_wait_ms (from /proc/self/schedstat:
 * time spent runnable but waiting for the CPU, i.e. other load on our CPU).
 *
 * Responses are framed by Content-Length; chunked bodies are handled minimally
 * (the response ends at the "0\r\n\r\n" terminator); without either the body
 * runs until the server closes.  Bounded: it sends at most RATE*DURATION
 * requests and exits DURATION + DRAIN seconds after the start at the latest.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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

#define MAX_CONNS 1024
#define MAX_REQUESTS 10000000ULL
#define BUF_SIZE 65536

typedef struct {
    int fd;
    int busy;          /* a request is outstanding */
    uint64_t req;      /* index of the outstanding request */
    size_t len;        /* bytes in buf */
    char buf[BUF_SIZE];
} conn_t;

static struct sockaddr_in g_addr;
static conn_t *g_conns;
static int g_nconns;
static int g_epfd;
static int *g_free;     /* stack of free connection indices */
static int g_nfree;
static char g_req[1024];
static size_t g_reqlen;

static uint64_t g_total;      /* requests to send */
static uint64_t g_next;       /* next request index to dispatch */
static uint64_t g_completed, g_errors, g_sent, g_reconnects;
static uint64_t g_conn_waits, g_wait_hi; /* requests that found every connection busy */
static uint64_t g_t0;
static double g_rate;
static int64_t *g_lat_ns;     /* per request; -1 = not done */
static int64_t *g_lag_ns;     /* per sent request: actual - intended send time */

static uint64_t intended_ns(uint64_t i) {
    return g_t0 + (uint64_t)((double)i * 1e9 / g_rate);
}

static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr) < 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static int attach(int idx) {
    conn_t *c = &g_conns[idx];
    c->fd = open_conn();
    c->busy = 0;
    c->len = 0;
    if (c->fd < 0) return -1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    g_free[g_nfree++] = idx;
    return 0;
}

/* Drop a connection (after an error or a server close) and open a new one. */
static void recycle(int idx, uint64_t now, int failed) {
    conn_t *c = &g_conns[idx];
    if (c->busy && failed) {
        g_errors++;
        g_lat_ns[c->req] = (int64_t)(now - intended_ns(c->req));
    }
    if (c->fd >= 0) {
        epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->busy = 0;
    g_reconnects++;
    attach(idx); /* on failure the slot simply stays dead */
}

/* Number of requests whose intended send time is <= now. */
static uint64_t due_count(uint64_t now) {
    if (now < g_t0) return 0;
    uint64_t due = (uint64_t)((double)(now - g_t0) * g_rate / 1e9) + 1;
    if (due > g_total) due = g_total;
    while (due < g_total && intended_ns(due) <= now) due++;
    while (due > 0 && intended_ns(due - 1) > now) due--;
    return due;
}

static void dispatch(uint64_t now) {
    uint64_t due = due_count(now);
    while (g_next < due && g_nfree > 0) {
        int idx = g_free[--g_nfree];
        conn_t *c = &g_conns[idx];
        ssize_t n = write(c->fd, g_req, g_reqlen);
        if (n != (ssize_t)g_reqlen) {
            /* tiny request on an idle socket: a short write means trouble */
            recycle(idx, now, 0);
            continue;
        }
        c->busy = 1;
        g_lag_ns[g_sent] = (int64_t)(now - intended_ns(g_next));
        c->req = g_next++;
        c->len = 0;
        g_sent++;
    }
    if (g_next < due) {
        /* due but no free connection: these wait (their latency still counts) */
        uint64_t from = g_next > g_wait_hi ? g_next : g_wait_hi;
        if (due > from) g_conn_waits += due - from;
        if (due > g_wait_hi) g_wait_hi = due;
    }
}

/* Arm the timer for the next intended send; 0 disarms.  Re-arming also clears
 * the expiration count, so the timerfd never needs to be read.  While requests
 * wait for a free connection the timer is off: a response dispatches them. */
static void arm_timer(int tfd, uint64_t now) {
    uint64_t want = 0;
    if (g_next < g_total) {
        want = intended_ns(g_next);
        if (want <= now && g_nfree == 0) want = 0;
    }
    arm_at(tfd, want);
}

static int parse_response(conn_t *c, int eof, int *status, int *close_after) {
    return parse_response_buf(c->buf, c->len, BUF_SIZE, eof, status, close_after);
}

static void on_readable(int idx, uint64_t now) {
    conn_t *c = &g_conns[idx];
    int eof = 0;
    for (;;) {
        if (c->len >= BUF_SIZE) break;
        ssize_t n = read(c->fd, c->buf + c->len, BUF_SIZE - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            /* a whole response is the usual case: skip the read that says EAGAIN */
            int st, ca;
            if (c->busy && parse_response(c, 0, &st, &ca) != 0) break;
            continue;
        }
        if (n == 0) eof = 1;
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) eof = 1;
        break;
    }
    if (!c->busy) {
        /* unsolicited data or close on an idle connection */
        if (eof || c->len) recycle(idx, now, 0);
        return;
    }
    int status = 0, close_after = 0;
    int r = parse_response(c, eof, &status, &close_after);
    if (r == 0 && !eof) return;
    if (r <= 0) {
        recycle(idx, now, 1);
        return;
    }
    g_lat_ns[c->req] = (int64_t)(now - intended_ns(c->req));
    g_completed++;
    if (status < 200 || status >= 400) g_errors++;
    c->busy = 0;
    c->len = 0;
    if (close_after || eof) {
        recycle(idx, now, 0);
    } else {
        g_free[g_nfree++] = idx;
    }
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s HOST PORT HOSTHEADER RATE DURATION_S [CONNS] [DRAIN_S]\n",
                argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    const char *hosthdr = argv[3];
    g_rate = atof(argv[4]);
    double duration = atof(argv[5]);
    g_nconns = argc > 6 ? atoi(argv[6]) : 64;
    double drain = argc > 7 ? atof(argv[7]) : 2.0;
    if (g_rate <= 0 || duration <= 0 || g_nconns < 1 || g_nconns > MAX_CONNS || drain < 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    double total_d = g_rate * duration;
    if (total_d < 1 || total_d > (double)MAX_REQUESTS) {
        fprintf(stderr, "rate*duration must be in [1, %llu]\n", MAX_REQUESTS);
        return 2;
    }
    g_total = (uint64_t)total_d;

    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &g_addr.sin_addr) != 1) {
        fprintf(stderr, "HOST must be an IPv4 address\n");
        return 2;
    }
    int n = snprintf(g_req, sizeof g_req,
                     "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: loadgen\r\n\r\n", hosthdr);
    if (n <= 0 || (size_t)n >= sizeof g_req) return 2;
    g_reqlen = (size_t)n;

    g_lat_ns = malloc(sizeof(int64_t) * g_total);
    g_lag_ns = malloc(sizeof(int64_t) * g_total);
    g_conns = calloc((size_t)g_nconns, sizeof(conn_t));
    g_free = calloc((size_t)g_nconns, sizeof(int));
    if (!g_lat_ns || !g_lag_ns || !g_conns || !g_free) return 3;
    for (uint64_t i = 0; i < g_total; i++) g_lat_ns[i] = -1;

    /* the default 50 us timer slack would delay every scheduled send */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    g_epfd = epoll_create1(0);
    for (int i = 0; i < g_nconns; i++) {
        g_conns[i].fd = -1;
        if (attach(i) < 0) {
            fprintf(stderr, "connect to %s:%d failed: %s\n", host, port, strerror(errno));
            return 1;
        }
    }
    int tfd = add_timer(g_epfd);

    g_t0 = now_ns() + 1000000ULL; /* start 1 ms from now */
    uint64_t send_end = g_t0 + (uint64_t)(duration * 1e9);
    uint64_t deadline = send_end + (uint64_t)(drain * 1e9);
    arm_timer(tfd, now_ns());

    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline) break;
        if (g_next >= g_total) {
            /* everything dispatched; stop once nothing is outstanding */
            int busy = 0;
            for (int i = 0; i < g_nconns; i++) busy |= g_conns[i].busy;
            if (!busy) break;
        }
        int timeout_ms = (int)((deadline - now) / 1000000ULL) + 1;
        int ne = epoll_wait(g_epfd, evs, 256, timeout_ms);
        if (ne < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        now = now_ns();
        for (int k = 0; k < ne; k++) {
            uint32_t id = evs[k].data.u32;
            if (id == UINT32_MAX) {
                g_armed = UINT64_MAX; /* expired: the next arm_timer re-arms */
                continue;
            }
            on_readable((int)id, now);
        }
        dispatch(now);
        arm_timer(tfd, now);
    }

    uint64_t end = now_ns();
    unsigned long long run_ns, wait_ns;
    sched_times(&run_ns, &wait_ns);
    /* anything not finished: lower-bound latency, counted as error */
    uint64_t incomplete = 0;
    for (uint64_t i = 0; i < g_total; i++) {
        if (g_lat_ns[i] < 0) {
            incomplete++;
            g_lat_ns[i] = (int64_t)(end > intended_ns(i) ? end - intended_ns(i) : 0);
        }
    }
    qsort(g_lat_ns, g_total, sizeof(int64_t), cmp_i64);
    qsort(g_lag_ns, g_sent, sizeof(int64_t), cmp_i64);
    double elapsed = (double)(end - g_t0) / 1e9;
    double send_window = (double)(send_end - g_t0) / 1e9;
    typedef unsigned long long ull;
    printf("{\"rate\": %.1f, \"duration\": %.3f, \"connections\": %d, \"intended\": %llu, "
           "\"sent\": %llu, \"completed\": %llu, \"errors\": %llu, \"incomplete\": %llu, "
           "\"reconnects\": %llu, \"conn_waits\": %llu, ",
           g_rate, duration, g_nconns, (ull)g_total, (ull)g_sent, (ull)g_completed,
           (ull)(g_errors + incomplete), (ull)incomplete, (ull)g_reconnects, (ull)g_conn_waits);
    printf("\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"max_us\": %.1f, ",
           pct(g_lat_ns, g_total, 0.50), pct(g_lat_ns, g_total, 0.90),
           pct(g_lat_ns, g_total, 0.99), pct(g_lat_ns, g_total, 0.999),
           (double)g_lat_ns[g_total - 1] / 1000.0);
    printf("\"send_lag_p50_us\": %.1f, \"send_lag_p99_us\": %.1f, \"achieved_rps\": %.1f, "
           "\"elapsed_s\": %.3f, \"cpu_ms\": %.1f, \"runqueue_wait_ms\": %.1f}\n",
           pct(g_lag_ns, g_sent, 0.50), pct(g_lag_ns, g_sent, 0.99),
           (double)g_completed / (send_window > 0 ? send_window : elapsed), elapsed,
           (double)run_ns / 1e6, (double)wait_ns / 1e6);
    return 0;
}
