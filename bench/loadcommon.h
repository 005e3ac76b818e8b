/*
 * loadcommon.h - what bench/loadgen.c and bench/prioload.c share: the clock,
 * the send timer, a minimal HTTP/1.1 response framer, nearest-rank percentiles
 * and the scheduler's account of the run.
 *
 * Header-only (static functions), included by each generator's single source
 * file, so each still builds with one gcc command.  Needs _GNU_SOURCE (memmem)
 * before the first system include.
 */
#ifndef MESHLAYER_LOADCOMMON_H
#define MESHLAYER_LOADCOMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A timerfd in epfd's set, its events tagged UINT32_MAX (connection indices are below). */
static int add_timer(int epfd) {
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev);
    return tfd;
}

/* When the timer is set to go off (absolute, ns; 0 = disarmed); UINT64_MAX = not known,
 * as after it went off: the next arm_at sets it whatever it is. */
static uint64_t g_armed = UINT64_MAX;

static void arm_at(int tfd, uint64_t want) {
    if (want == g_armed) return;
    g_armed = want;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = (time_t)(want / 1000000000ULL);
    its.it_value.tv_nsec = (long)(want % 1000000000ULL);
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* Whether buf[0..len) (of capacity cap) holds one whole response.
 * Return: 1 = complete, 0 = need more, -1 = malformed or larger than cap.
 * *status gets the status code, *close_after is set if the server will close. */
static int parse_response_buf(const char *buf, size_t len, size_t cap, int eof, int *status,
                              int *close_after) {
    const char *hend = memmem(buf, len, "\r\n\r\n", 4);
    if (!hend) return len >= cap ? -1 : 0;
    size_t hlen = (size_t)(hend - buf) + 4;
    if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    *close_after = strncmp(buf, "HTTP/1.0", 8) == 0;
    long clen = -1;
    int chunked = 0;
    const char *line = (const char *)memchr(buf, '\n', hlen) + 1;
    while (line < buf + hlen - 2) {
        const char *eol = memchr(line, '\n', (size_t)(buf + hlen - line));
        if (!eol) break;
        size_t ll = (size_t)(eol - line);
        if (strncasecmp(line, "content-length:", 15) == 0) {
            clen = strtol(line + 15, NULL, 10);
        } else if (strncasecmp(line, "transfer-encoding:", 18) == 0) {
            if (memmem(line, ll, "chunked", 7)) chunked = 1;
        } else if (strncasecmp(line, "connection:", 11) == 0) {
            if (memmem(line, ll, "close", 5)) *close_after = 1;
            if (memmem(line, ll, "keep-alive", 10)) *close_after = 0;
        }
        line = eol + 1;
    }
    if (*status == 204 || *status == 304 || (*status >= 100 && *status < 200)) return 1;
    if (chunked) {
        if (len >= hlen + 5 && memmem(buf + hlen - 2, len - hlen + 2, "\r\n0\r\n\r\n", 7))
            return 1;
        return len >= cap ? -1 : 0;
    }
    if (clen >= 0) {
        if ((long)(len - hlen) >= clen) return 1;
        return hlen + (size_t)clen > cap ? -1 : 0;
    }
    *close_after = 1;
    return eof ? 1 : (len >= cap ? -1 : 0);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest value with at least q*n values <= it, ns -> us.
 * v sorted ascending; -1 when n == 0. */
static double pct(const int64_t *v, size_t n, double q) {
    if (n == 0) return -1;
    double r = q * (double)n;
    size_t k = (size_t)r;
    if ((double)k < r) k++;
    if (k > 0) k--;
    if (k >= n) k = n - 1;
    return (double)v[k] / 1000.0;
}

/* This process's time running and runnable-but-waiting (CPU contention), ns; 0 and 0
 * where /proc/self/schedstat cannot be read. */
static void sched_times(unsigned long long *run_ns, unsigned long long *wait_ns) {
    *run_ns = *wait_ns = 0;
    FILE *ss = fopen("/proc/self/schedstat", "r");
    if (ss) {
        if (fscanf(ss, "%llu %llu", run_ns, wait_ns) != 2) *run_ns = *wait_ns = 0;
        fclose(ss);
    }
}

#endif
