/*
 * dp-agent: the workload agent of the data plane's test guest.
 *
 * Runs as the only program of a tiny initramfs guest (started by /init) and
 * does three independent things, each in its own thread, all configured from
 * `dp.*` parameters on the kernel command line (/proc/cmdline):
 *
 *   heartbeat  every dp.hb_ms ms print  "HB <counter> <boot_id> <uptime_ms>"
 *   dirtier    keep dp.dirty_mib MiB of memory and rewrite it at
 *              dp.dirty_rate MiB/s with dp.pattern (zero|text|random); every
 *              text or random page carries its index, its generation (how many
 *              times it was rewritten) and a checksum, and is verified just
 *              before it is rewritten
 *   checker    walk the whole dirtied area at dp.check_rate MiB/s, verify every
 *              page against the generation the dirtier last gave it, print
 *              "RAMBAD page=.. expected_gen=.. found_gen=.. why=.." for each
 *              mismatch and "RAMCHECK <pass> ..." after each full pass
 *   journal    write self-verifying records to the raw block device dp.disk
 *              at dp.disk_rate records/s, print "ACK <seq>" once each record
 *              is durable
 *
 * The serial line formats and the on-disk layout are documented in
 * docs/test-guest.md and checked on the host by dataplane/testing/journal.py;
 * the three must change together (bump the version numbers below).
 *
 * Build: gcc -static -O2 -pthread -o dp-agent agent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define JOURNAL_VERSION 1u
#define HDR_SIZE 4096u
#define REC_HDR_SIZE 64u
static const char REC_MAGIC[8] = {'D', 'P', 'J', 'R', 'N', 'L', '0', '1'};
static const char HDR_MAGIC[8] = {'D', 'P', 'J', 'H', 'D', 'R', '0', '1'};

/* ------------------------------------------------------------------ config */

struct config {
    long hb_ms;
    long dirty_mib;
    long dirty_rate; /* MiB/s */
    char pattern[16];
    char disk[128];
    long disk_rate; /* records/s */
    long disk_rec;  /* bytes per record */
    long check_rate; /* MiB/s the checker verifies; 0 = checker off */
};

static struct config cfg = {
    .hb_ms = 100,
    .dirty_mib = 16,
    .dirty_rate = 4,
    .pattern = "text",
    .disk = "/dev/vda",
    .disk_rate = 0,
    .disk_rec = 4096,
    .check_rate = 128,
};

static uint64_t boot_id;
static char boot_id_hex[17];

/* ------------------------------------------------------------------ output */

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* One line, one write(2): lines from different threads never interleave. */
static void emit(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    pthread_mutex_lock(&out_lock);
    size_t off = 0;
    while (off < (size_t)n) {
        ssize_t w = write(STDOUT_FILENO, buf + off, (size_t)n - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        off += (size_t)w;
    }
    pthread_mutex_unlock(&out_lock);
}

/* ------------------------------------------------------------------ time */

static uint64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t deadline_ns) {
    struct timespec ts = {
        .tv_sec = (time_t)(deadline_ns / 1000000000ull),
        .tv_nsec = (long)(deadline_ns % 1000000000ull),
    };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* ------------------------------------------------------------------ hashing */

static uint64_t mix64(uint64_t z) { /* splitmix64 finaliser */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t crc_table[256];

static void crc32_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* CRC-32 (IEEE 802.3, reflected; equal to zlib.crc32). */
static uint32_t crc32_buf(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* ------------------------------------------------------------------ cmdline */

static void parse_cmdline(void) {
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0) {
        emit("ERR cmdline: open /proc/cmdline: %s", strerror(errno));
        return;
    }
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(tok, "dp.", 3) != 0)
            continue;
        char *key = tok + 3;
        char *eq = strchr(key, '=');
        if (!eq)
            continue;
        *eq = 0;
        const char *val = eq + 1;
        if (!strcmp(key, "hb_ms"))
            cfg.hb_ms = atol(val);
        else if (!strcmp(key, "dirty_mib"))
            cfg.dirty_mib = atol(val);
        else if (!strcmp(key, "dirty_rate"))
            cfg.dirty_rate = atol(val);
        else if (!strcmp(key, "pattern"))
            snprintf(cfg.pattern, sizeof(cfg.pattern), "%s", val);
        else if (!strcmp(key, "disk"))
            snprintf(cfg.disk, sizeof(cfg.disk), "%s", val);
        else if (!strcmp(key, "disk_rate"))
            cfg.disk_rate = atol(val);
        else if (!strcmp(key, "disk_rec"))
            cfg.disk_rec = atol(val);
        else if (!strcmp(key, "check_rate"))
            cfg.check_rate = atol(val);
        else
            emit("ERR cmdline: unknown parameter dp.%s", key);
    }
}

/* ------------------------------------------------------------------ heartbeat */

static void *heartbeat_main(void *arg) {
    (void)arg;
    uint64_t period = (uint64_t)cfg.hb_ms * 1000000ull;
    uint64_t next = now_ns(CLOCK_MONOTONIC);
    for (uint64_t counter = 1;; counter++) {
        emit("HB %llu %s %llu", (unsigned long long)counter, boot_id_hex,
             (unsigned long long)(now_ns(CLOCK_BOOTTIME) / 1000000ull));
        next += period;
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        if (next < now) /* paused (e.g. migration downtime): do not burst */
            next = now;
        sleep_until(next);
    }
    return NULL;
}

/* ------------------------------------------------------------------ dirtier */

enum pattern { PAT_ZERO, PAT_TEXT, PAT_RANDOM };

static const char *const WORDS[] = {
    "the",       "migration", "of",       "a",        "running",   "virtual", "machine",  "copies",
    "memory",    "pages",     "while",    "guest",    "keeps",     "writing", "to",       "them",
    "and",       "dirty",     "bitmap",   "tracks",   "which",     "ones",    "changed",  "since",
    "last",      "pass",      "storage",  "blocks",   "are",       "mirrored", "over",    "network",
    "with",      "checksum",  "journal",  "record",   "sequence",  "number",  "is",       "acknowledged",
    "after",     "flush",     "host",     "source",   "destination", "cluster", "disk",   "image",
    "compressed", "stream",   "bandwidth", "downtime", "converge", "iteration", "payload", "buffer",
    "kernel",    "device",    "queue",    "request",  "completion", "interrupt", "vector", "table",
};
#define NWORDS (sizeof(WORDS) / sizeof(WORDS[0]))

static inline uint64_t xorshift64(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static size_t fmt_u64(char *p, uint64_t v) {
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/* Text pool: log-like English lines "<n> word word 1234 word ...\n", generated
 * once; text pages are copied from it at random offsets and stamped, so the
 * content is realistic, compressible, and different on every rewrite. */
#define TEXT_POOL (256u << 10)
#define PAGE 4096u
static char *text_pool;

static void make_text_pool(uint64_t seed) {
    text_pool = malloc(TEXT_POOL + 256);
    uint64_t rng = seed | 1, line = 0;
    size_t n = 0;
    while (n < TEXT_POOL) {
        n += fmt_u64(text_pool + n, ++line);
        int words = 6 + (int)(xorshift64(&rng) % 8);
        for (int i = 0; i < words; i++) {
            text_pool[n++] = ' ';
            uint64_t r = xorshift64(&rng);
            if ((r & 7) == 0) {
                n += fmt_u64(text_pool + n, (r >> 8) % 100000);
            } else {
                const char *w = WORDS[(r >> 3) % NWORDS];
                size_t l = strlen(w);
                memcpy(text_pool + n, w, l);
                n += l;
            }
        }
        text_pool[n++] = '\n';
    }
}

/* Every text or random page starts with a 32-byte stamp that makes it checkable on its own:
 *   0  u32 magic "DPRM"     4  u32 page index     8  u64 generation
 *   16 u64 checksum of bytes 32..4095, keyed with the index, the generation and the boot id
 *   24 u64 zero
 * Write number w (counting from 0 over the whole area, the initial touch included) rewrites page
 * w % npages with generation w / npages, so the generation every page must hold follows from how
 * many writes are done. Zero pages carry no stamp: they must stay all zero. */
#define RAM_MAGIC 0x4D525044u /* "DPRM" little-endian */
#define STAMP 32u

static enum pattern ram_pat = PAT_TEXT;
static uint8_t *ram;
static size_t ram_pages;
/* Writes started and writes finished (a seqlock in two counters, see check_page). */
static uint64_t ram_started, ram_done;

static uint64_t page_sum(const uint8_t *page, uint64_t index, uint64_t gen) {
    uint64_t a = boot_id ^ 0x243F6A8885A308D3ull, b = index ^ 0x13198A2E03707344ull;
    uint64_t c = gen ^ 0xA4093822299F31D0ull, d = 0x082EFA98EC4E6C89ull;
    const uint64_t *w = (const uint64_t *)(page + STAMP);
    for (size_t i = 0; i < (PAGE - STAMP) / 8; i += 4) {
        a = (a ^ w[i]) * 0x9E3779B97F4A7C15ull;
        b = (b ^ w[i + 1]) * 0xC2B2AE3D27D4EB4Full;
        c = (c ^ w[i + 2]) * 0x165667B19E3779F9ull;
        d = (d ^ w[i + 3]) * 0xD6E8FEB86659FD93ull;
    }
    return mix64(a ^ mix64(b ^ mix64(c ^ mix64(d))));
}

/* Write number w: fill page w % npages with the pattern and stamp it. */
static void write_page(uint8_t *page, uint64_t *rng, uint64_t gen, uint64_t index) {
    if (ram_pat == PAT_ZERO) {
        memset(page, 0, PAGE);
        return;
    }
    if (ram_pat == PAT_RANDOM) {
        uint64_t *w = (uint64_t *)(page + STAMP);
        for (size_t i = 0; i < (PAGE - STAMP) / 8; i++)
            w[i] = xorshift64(rng);
    } else {
        uint8_t *body = page + STAMP;
        memcpy(body, text_pool + xorshift64(rng) % (TEXT_POOL - PAGE), PAGE - STAMP);
        char stamp[48];
        size_t n = 0;
        memcpy(stamp, "page ", 5);
        n = 5 + fmt_u64(stamp + 5, index);
        memcpy(stamp + n, " pass ", 6);
        n += 6;
        n += fmt_u64(stamp + n, gen);
        stamp[n++] = '\n';
        memcpy(body, stamp, n);
        page[PAGE - 1] = '\n';
    }
    put_u32(page, RAM_MAGIC);
    put_u32(page + 4, (uint32_t)index);
    put_u64(page + 8, gen);
    put_u64(page + 16, page_sum(page, index, gen));
    put_u64(page + 24, 0);
}

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* NULL if `page` is what write (index, gen) left there, else why not; *found = the generation it holds. */
static const char *page_fault(const uint8_t *page, uint64_t index, uint64_t gen, int64_t *found) {
    *found = -1;
    if (ram_pat == PAT_ZERO) {
        for (size_t i = 0; i < PAGE; i++)
            if (page[i])
                return "nonzero";
        return NULL;
    }
    if (get_u32(page) != RAM_MAGIC) {
        for (size_t i = 0; i < PAGE; i++)
            if (page[i])
                return "no-stamp";
        return "zeroed";
    }
    uint64_t held = get_u64(page + 8);
    *found = (int64_t)held;
    if (get_u32(page + 4) != (uint32_t)index)
        return "wrong-page";
    if (get_u64(page + 16) != page_sum(page, index, held))
        return "checksum";
    if (held != gen)
        return held < gen ? "stale" : "ahead";
    return NULL;
}

static uint64_t bad_pages;      /* mismatches found, by either thread */
static uint64_t reports_left = 32; /* RAMBAD lines still allowed in this pass of the checker */

static void report_bad(const char *by, uint64_t index, uint64_t gen, int64_t found, const char *why) {
    __atomic_add_fetch(&bad_pages, 1, __ATOMIC_RELAXED);
    uint64_t left = __atomic_load_n(&reports_left, __ATOMIC_RELAXED);
    do { /* take one line of the pass's allowance, never below zero (both threads report) */
        if (left == 0)
            return;
    } while (!__atomic_compare_exchange_n(&reports_left, &left, left - 1, 0, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    emit("RAMBAD page=%llu expected_gen=%llu found_gen=%lld why=%s by=%s", (unsigned long long)index,
         (unsigned long long)gen, (long long)found, why, by);
}

/* Write number w: verify what the previous write of that page left, then rewrite it. */
static void rewrite(uint64_t w, uint64_t *rng) {
    uint64_t index = w % ram_pages, gen = w / ram_pages;
    uint8_t *page = ram + index * PAGE;
    if (gen > 0) {
        int64_t found;
        const char *why = page_fault(page, index, gen - 1, &found);
        if (why)
            report_bad("dirtier", index, gen - 1, found, why);
    }
    __atomic_store_n(&ram_started, w + 1, __ATOMIC_SEQ_CST);
    /* the page's stores must not become visible before the count that announces them */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    write_page(page, rng, gen, index);
    __atomic_store_n(&ram_done, w + 1, __ATOMIC_RELEASE);
}

static void *dirtier_main(void *arg) {
    (void)arg;
    if (!strcmp(cfg.pattern, "zero"))
        ram_pat = PAT_ZERO;
    else if (!strcmp(cfg.pattern, "random"))
        ram_pat = PAT_RANDOM;
    else if (strcmp(cfg.pattern, "text"))
        emit("ERR dirty: unknown pattern '%s', using text", cfg.pattern);

    size_t npages = ((size_t)cfg.dirty_mib << 20) / PAGE;
    uint8_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        emit("ERR dirty: cannot allocate %ld MiB: %s", cfg.dirty_mib, strerror(errno));
        return NULL;
    }
    ram = mem;
    ram_pages = npages;
    uint64_t rng = mix64(boot_id ^ 0x5DEECE66Dull) | 1;
    if (ram_pat == PAT_TEXT)
        make_text_pool(boot_id);
    /* Touch everything once, so the whole area is resident and holds the pattern (generation 0). */
    uint64_t w = 0;
    for (; w < npages; w++)
        rewrite(w, &rng);
    emit("DIRTY_READY %ld %s", cfg.dirty_mib, cfg.pattern);
    if (cfg.dirty_rate <= 0)
        return NULL;

    /* Paced in 10 ms slices: each slice rewrites the pages it owes, round robin. */
    const uint64_t slice_ns = 10000000ull;
    const uint64_t per_slice = ((uint64_t)cfg.dirty_rate << 20) / 100;
    uint64_t owed = 0, total = 0, last_total = 0;
    uint64_t next = now_ns(CLOCK_MONOTONIC), last_report = next;
    for (;;) {
        owed += per_slice;
        while (owed >= PAGE) {
            rewrite(w++, &rng);
            owed -= PAGE;
            total += PAGE;
        }
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        if (now - last_report >= 1000000000ull) {
            uint64_t kib_s = (total - last_total) * 1000000000ull / (now - last_report) / 1024;
            emit("DIRTY %llu %llu", (unsigned long long)total, (unsigned long long)kib_s);
            last_total = total;
            last_report = now;
        }
        next += slice_ns;
        if (next + 100 * slice_ns < now) /* fell far behind (paused, or too slow): do not burst */
            next = now;
        sleep_until(next);
    }
    return NULL;
}

/* ------------------------------------------------------------------ checker */

/* Verify page `index` against the write that last finished there. Returns 1 if checked, 0 if the
 * dirtier rewrote it while it was being read (the caller tries again). The copy is consistent when
 * no write of this page started between reading `ram_done` before it and `ram_started` after it. */
static int check_page(uint64_t index, uint8_t *copy) {
    uint64_t done = __atomic_load_n(&ram_done, __ATOMIC_ACQUIRE);
    if (done <= index)
        return 1; /* never written yet */
    uint64_t last = done - 1 - ((done - 1 - index) % ram_pages); /* last finished write of this page */
    memcpy(copy, ram + index * PAGE, PAGE);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint64_t started = __atomic_load_n(&ram_started, __ATOMIC_ACQUIRE);
    if (last + ram_pages < started)
        return 0; /* the next write of this page began before the copy was complete */
    int64_t found;
    uint64_t gen = last / ram_pages;
    const char *why = page_fault(copy, index, gen, &found);
    if (why)
        report_bad("checker", index, gen, found, why);
    return 1;
}

static void *checker_main(void *arg) {
    (void)arg;
    /* Yield to the heartbeat and the dirtier: the checker only uses spare CPU of the vCPU. */
    setpriority(PRIO_PROCESS, (id_t)gettid(), 10);
    while (__atomic_load_n(&ram_done, __ATOMIC_ACQUIRE) < ram_pages || ram_pages == 0)
        usleep(10000);
    uint8_t *copy = malloc(PAGE);
    const uint64_t slice_ns = 10000000ull;
    const uint64_t per_slice = ((uint64_t)cfg.check_rate << 20) / 100;
    uint64_t owed = 0, next = now_ns(CLOCK_MONOTONIC);
    for (uint64_t pass = 1;; pass++) {
        uint64_t t0 = now_ns(CLOCK_MONOTONIC), raced = 0;
        uint64_t bad0 = __atomic_load_n(&bad_pages, __ATOMIC_RELAXED);
        __atomic_store_n(&reports_left, 32, __ATOMIC_RELAXED);
        for (uint64_t index = 0; index < ram_pages; index++) {
            while (owed < PAGE) {
                owed += per_slice;
                next += slice_ns;
                uint64_t now = now_ns(CLOCK_MONOTONIC);
                if (next + 100 * slice_ns < now) /* paused, or too slow: do not burst */
                    next = now;
                sleep_until(next);
            }
            owed -= PAGE;
            int tries = 0;
            while (!check_page(index, copy) && ++tries < 8)
                raced++;
        }
        emit("RAMCHECK %llu pages=%zu bad=%llu raced=%llu ms=%llu", (unsigned long long)pass, ram_pages,
             (unsigned long long)(__atomic_load_n(&bad_pages, __ATOMIC_RELAXED) - bad0),
             (unsigned long long)raced, (unsigned long long)((now_ns(CLOCK_MONOTONIC) - t0) / 1000000ull));
    }
    return NULL;
}

/* ------------------------------------------------------------------ journal */

/* Payload of record `seq`: the 64-byte block below, repeated. */
static void payload_block(uint64_t seq, uint8_t block[64]) {
    uint64_t seed = boot_id ^ (seq * 0x9E3779B97F4A7C15ull);
    for (int i = 0; i < 8; i++)
        put_u64(block + 8 * i, mix64(seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull));
}

static int pwrite_all(int fd, const uint8_t *buf, size_t len, off_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(fd, buf + done, len - done, off + (off_t)done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        done += (size_t)w;
    }
    return fdatasync(fd);
}

static void *journal_main(void *arg) {
    (void)arg;
    size_t rec = (size_t)cfg.disk_rec;
    if (rec < 512 || rec % 512) {
        emit("ERR disk: dp.disk_rec=%ld must be a multiple of 512, using 4096", cfg.disk_rec);
        rec = 4096;
    }
    int fd = -1;
    for (int tries = 0; tries < 20; tries++) { /* the device node may appear late */
        fd = open(cfg.disk, O_RDWR | O_DIRECT | O_DSYNC | O_CLOEXEC);
        if (fd >= 0 || errno != ENOENT)
            break;
        usleep(100000);
    }
    if (fd < 0) {
        emit("ERR disk: open %s: %s (journal off)", cfg.disk, strerror(errno));
        return NULL;
    }
    uint64_t devsize = 0;
    if (ioctl(fd, BLKGETSIZE64, &devsize) < 0) {
        struct stat st;
        if (fstat(fd, &st) == 0)
            devsize = (uint64_t)st.st_size;
    }
    if (devsize < HDR_SIZE + rec) {
        emit("ERR disk: %s is too small (%llu bytes, journal off)", cfg.disk, (unsigned long long)devsize);
        close(fd);
        return NULL;
    }
    uint64_t nslots = (devsize - HDR_SIZE) / rec;
    uint8_t *buf;
    if (posix_memalign((void **)&buf, 4096, rec > HDR_SIZE ? rec : HDR_SIZE)) {
        emit("ERR disk: out of memory (journal off)");
        close(fd);
        return NULL;
    }

    /* Header block at offset 0: who writes, and the geometry. */
    memset(buf, 0, HDR_SIZE);
    memcpy(buf, HDR_MAGIC, 8);
    put_u32(buf + 8, JOURNAL_VERSION);
    put_u32(buf + 12, (uint32_t)rec);
    put_u64(buf + 16, boot_id);
    put_u64(buf + 24, nslots);
    put_u64(buf + 32, HDR_SIZE);
    put_u64(buf + 40, devsize);
    put_u32(buf + HDR_SIZE - 4, crc32_buf(buf, HDR_SIZE - 4));
    while (pwrite_all(fd, buf, HDR_SIZE, 0) < 0) {
        emit("ERR disk: header write: %s (retrying)", strerror(errno));
        sleep(1);
    }
    emit("JOURNAL %s %s size=%llu rec=%zu nslots=%llu rate=%ld", boot_id_hex, cfg.disk,
         (unsigned long long)devsize, rec, (unsigned long long)nslots, cfg.disk_rate);

    uint64_t period = 1000000000ull / (uint64_t)cfg.disk_rate;
    uint64_t next = now_ns(CLOCK_MONOTONIC);
    uint8_t block[64];
    for (uint64_t seq = 1;; seq++) {
        uint64_t slot = (seq - 1) % nslots;
        memset(buf, 0, REC_HDR_SIZE);
        memcpy(buf, REC_MAGIC, 8);
        put_u32(buf + 8, JOURNAL_VERSION);
        put_u32(buf + 12, (uint32_t)rec);
        put_u64(buf + 16, boot_id);
        put_u64(buf + 24, seq);
        put_u64(buf + 32, slot);
        put_u64(buf + 40, nslots);
        put_u64(buf + 48, now_ns(CLOCK_BOOTTIME));
        payload_block(seq, block);
        for (size_t i = REC_HDR_SIZE; i < rec - 4; i++)
            buf[i] = block[i % 64];
        put_u32(buf + rec - 4, crc32_buf(buf, rec - 4));
        /* Retry the same record until it is durable: never skip a sequence number. */
        while (pwrite_all(fd, buf, rec, (off_t)(HDR_SIZE + slot * rec)) < 0) {
            emit("ERR disk: write seq=%llu: %s (retrying)", (unsigned long long)seq, strerror(errno));
            usleep(100000);
        }
        emit("ACK %llu", (unsigned long long)seq);
        next += period;
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        if (next < now)
            next = now;
        sleep_until(next);
    }
    return NULL;
}

/* ------------------------------------------------------------------ main */

static void make_boot_id(void) {
    uint64_t r = 0;
    /* GRND_INSECURE: never block on an uninitialised crng this early in boot. */
    if (getrandom(&r, sizeof(r), GRND_NONBLOCK | 0x0004 /* GRND_INSECURE */) != (ssize_t)sizeof(r) &&
        getrandom(&r, sizeof(r), GRND_NONBLOCK) != (ssize_t)sizeof(r))
        r = 0;
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    r ^= mix64(((uint64_t)hi << 32 | lo) ^ now_ns(CLOCK_REALTIME) ^ ((uint64_t)getpid() << 48));
    if (r == 0)
        r = 1;
    boot_id = r;
    snprintf(boot_id_hex, sizeof(boot_id_hex), "%016llx", (unsigned long long)boot_id);
}

int main(void) {
    crc32_init();
    make_boot_id();
    parse_cmdline();
    if (cfg.hb_ms <= 0)
        cfg.hb_ms = 100;
    emit("DPAGENT %s hb_ms=%ld dirty_mib=%ld dirty_rate=%ld pattern=%s disk=%s disk_rate=%ld disk_rec=%ld "
         "check_rate=%ld",
         boot_id_hex, cfg.hb_ms, cfg.dirty_mib, cfg.dirty_rate, cfg.pattern, cfg.disk, cfg.disk_rate,
         cfg.disk_rec, cfg.check_rate);

    pthread_t t;
    if (pthread_create(&t, NULL, heartbeat_main, NULL)) {
        emit("ERR cannot start the heartbeat thread");
        return 1;
    }
    if (cfg.dirty_mib > 0 && pthread_create(&t, NULL, dirtier_main, NULL))
        emit("ERR cannot start the dirtier thread");
    else if (cfg.dirty_mib > 0 && cfg.check_rate > 0 && pthread_create(&t, NULL, checker_main, NULL))
        emit("ERR cannot start the checker thread");
    if (cfg.disk_rate > 0 && cfg.disk[0] && pthread_create(&t, NULL, journal_main, NULL))
        emit("ERR cannot start the journal thread");
    for (;;)
        pause();
}
