/*
 * dp-agent: the workload agent of the data plane's test guest.
 *
 * Runs as the only program of a tiny initramfs guest (started by /init) and
 * does three independent things, each in its own thread, all configured from
 * `dp.*` parameters on the kernel command line (/proc/cmdline):
 *
 *   heartbeat  every dp.hb_ms ms print  "HB <counter> <boot_id> <uptime_ms>"
 *   dirtier    keep dp.dirty_mib MiB of memory and rewrite it at
 *              dp.dirty_rate MiB/s with dp.pattern (zero|text|random)
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
};

static struct config cfg = {
    .hb_ms = 100,
    .dirty_mib = 0,
    .dirty_rate = 0,
    .pattern = "text",
    .disk = "/dev/vda",
    .disk_rate = 0,
    .disk_rec = 4096,
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

/* Rewrite one 4 KiB page; `gen` counts passes over the area. */
static void write_page(enum pattern pat, uint8_t *page, uint64_t *rng, uint64_t gen, uint64_t index) {
    if (pat == PAT_ZERO) {
        memset(page, 0, PAGE);
    } else if (pat == PAT_RANDOM) {
        uint64_t *w = (uint64_t *)page;
        for (size_t i = 0; i < PAGE / 8; i++)
            w[i] = xorshift64(rng);
    } else {
        memcpy(page, text_pool + xorshift64(rng) % (TEXT_POOL - PAGE), PAGE);
        char stamp[48];
        size_t n = 0;
        memcpy(stamp, "page ", 5);
        n = 5 + fmt_u64(stamp + 5, index);
        memcpy(stamp + n, " pass ", 6);
        n += 6;
        n += fmt_u64(stamp + n, gen);
        stamp[n++] = '\n';
        memcpy(page, stamp, n);
        page[PAGE - 1] = '\n';
    }
}

static void *dirtier_main(void *arg) {
    (void)arg;
    enum pattern pat = PAT_TEXT;
    if (!strcmp(cfg.pattern, "zero"))
        pat = PAT_ZERO;
    else if (!strcmp(cfg.pattern, "random"))
        pat = PAT_RANDOM;
    else if (strcmp(cfg.pattern, "text"))
        emit("ERR dirty: unknown pattern '%s', using text", cfg.pattern);

    size_t npages = ((size_t)cfg.dirty_mib << 20) / PAGE;
    uint8_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        emit("ERR dirty: cannot allocate %ld MiB: %s", cfg.dirty_mib, strerror(errno));
        return NULL;
    }
    uint64_t rng = mix64(boot_id ^ 0x5DEECE66Dull) | 1;
    if (pat == PAT_TEXT)
        make_text_pool(boot_id);
    /* Touch everything once, so the whole area is resident and holds the pattern. */
    for (size_t i = 0; i < npages; i++)
        write_page(pat, mem + i * PAGE, &rng, 0, i);
    emit("DIRTY_READY %ld %s", cfg.dirty_mib, cfg.pattern);
    if (cfg.dirty_rate <= 0)
        return NULL;

    /* Paced in 10 ms slices: each slice rewrites the pages it owes, round robin. */
    const uint64_t slice_ns = 10000000ull;
    const uint64_t per_slice = ((uint64_t)cfg.dirty_rate << 20) / 100;
    uint64_t owed = 0, total = 0, last_total = 0, gen = 1;
    size_t cursor = 0;
    uint64_t next = now_ns(CLOCK_MONOTONIC), last_report = next;
    for (;;) {
        owed += per_slice;
        while (owed >= PAGE) {
            write_page(pat, mem + cursor * PAGE, &rng, gen, cursor);
            owed -= PAGE;
            total += PAGE;
            if (++cursor == npages) {
                cursor = 0;
                gen++;
            }
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
    emit("DPAGENT %s hb_ms=%ld dirty_mib=%ld dirty_rate=%ld pattern=%s disk=%s disk_rate=%ld disk_rec=%ld",
         boot_id_hex, cfg.hb_ms, cfg.dirty_mib, cfg.dirty_rate, cfg.pattern, cfg.disk, cfg.disk_rate,
         cfg.disk_rec);

    pthread_t t;
    if (pthread_create(&t, NULL, heartbeat_main, NULL)) {
        emit("ERR cannot start the heartbeat thread");
        return 1;
    }
    if (cfg.dirty_mib > 0 && pthread_create(&t, NULL, dirtier_main, NULL))
        emit("ERR cannot start the dirtier thread");
    if (cfg.disk_rate > 0 && cfg.disk[0] && pthread_create(&t, NULL, journal_main, NULL))
        emit("ERR cannot start the journal thread");
    for (;;)
        pause();
}
