/* The floor of any per-call malloc recorder, for bench/run's `floor` mode: an LD_PRELOAD library
 * whose malloc and free forward straight to glibc (__libc_malloc/__libc_free, no lookup, no
 * guard, no checks) and append one event each — 16 bytes for malloc, 8 for free, fewer than
 * mtrace writes — to a 64 KiB per-thread buffer that wraps around and that nobody reads (no
 * shared memory, no publication, no time marks, no chunk header, no recorder). Only malloc and
 * free are hooked: good for churn.c and nothing else. What it costs over bare is what hooking
 * and recording cost before any of the work that makes a trace usable. */
#include <stddef.h>
#include <stdint.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);

static __thread uint64_t events[8192] __attribute__((tls_model("initial-exec")));

/* The stores must happen although nothing reads them: tell the compiler the buffer is used. */
#define KEEP() __asm__ volatile("" : : "r"(events) : "memory")
static __thread unsigned at __attribute__((tls_model("initial-exec")));

void *malloc(size_t n) {
    void *p = __libc_malloc(n);
    unsigned i = at;
    events[i] = (uint64_t)p;
    events[(i + 1) & 8191] = n;
    KEEP();
    at = (i + 2) & 8191;
    return p;
}

void free(void *p) {
    unsigned i = at;
    events[i] = (uint64_t)p | 1;
    KEEP();
    at = (i + 1) & 8191;
    __libc_free(p);
}
