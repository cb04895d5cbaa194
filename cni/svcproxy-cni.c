/*
 * svcproxy-cni: the chained CNI plugin as a small static executable.
 *
 * The container runtime runs it on the host for every Pod, so it must not need
 * anything there (no Python, no shared libraries). It holds no CNI logic: it sends
 * the whole invocation (the CNI_* variables and the network configuration read on
 * stdin) to the svcproxy agent's unix socket as one JSON line,
 *
 *   {"op": "cni", "env": {"CNI_COMMAND": "ADD", ...}, "stdin": "<configuration>"}
 *
 * and relays the answer, {"ok": true, "rc": N, "stdout": "..", "stderr": ".."}: what
 * the agent's copy of the plugin logic (svcproxy/podns/cni.py) printed, and its exit
 * status. It does on its own only what cannot wait for the agent:
 *
 *   - VERSION, answered locally (libcni asks it before anything else);
 *   - finding the socket and the time limit in the configuration ("socket",
 *     "timeout", as the Python plugin reads them);
 *   - the answer when the agent is unreachable, hangs, or answers nonsense:
 *     ADD and CHECK fail with CNI error 11 (try again later: the kubelet retries),
 *     STATUS with 50 (plugin not available), DEL and GC succeed (the agent forgets
 *     namespaces that vanished on its own).
 *
 * Every read is bounded in size and time; JSON is tokenized with jsmn (no recursion,
 * no allocation but the token array).
 */
#define _GNU_SOURCE
#define JSMN_STATIC
#define JSMN_STRICT
#define JSMN_PARENT_LINKS
#include "jsmn.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PLUGIN "svcproxy-cni"
#define DEFAULT_SOCKET "/run/svcproxy/cni.sock"
#define DEFAULT_TIMEOUT 30.0
#define DEL_TIMEOUT 10.0   /* DEL, STATUS and GC must not hold a Pod up for long */
#define STDIN_TIMEOUT 60.0 /* a runtime writes the configuration and closes stdin */
#define MAX_LINE (1 << 20) /* the agent's limit for a request line */
#define MAX_ANSWER (8 << 20)

#define ERR_INVALID_ENV 4
#define ERR_IO 5
#define ERR_DECODE 6
#define ERR_INVALID_CONFIG 7
#define ERR_TRY_AGAIN_LATER 11
#define ERR_NOT_AVAILABLE 50

/* What svcproxy.podns.install looks for before it replaces or removes a file. */
__attribute__((used)) static const char marker[] =
    "svcproxy-cni static plugin, installed by svcproxy.podns.install";

static const char *const supported[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define NSUPPORTED (sizeof supported / sizeof supported[0])
#define LATEST "1.1.0"

/* What each command does when the agent cannot be asked, and the variables it needs
 * (checked here as the agent checks them, so a missing one is error 4 either way). */
struct command {
    const char *name;
    int code; /* the CNI error; 0: succeed (with a line on stderr) */
    const char *const *required;
};
static const char *const pod_env[] = {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH", NULL};
static const char *const del_env[] = {"CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH", NULL};
static const char *const no_env[] = {NULL};
static const struct command commands[] = {
    {"ADD", ERR_TRY_AGAIN_LATER, pod_env}, {"CHECK", ERR_TRY_AGAIN_LATER, pod_env}, {"DEL", 0, del_env},
    {"STATUS", ERR_NOT_AVAILABLE, no_env}, {"GC", 0, no_env},
};
static const char *const forwarded_env[] = {
    "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
};

/* ------------------------------------------------------------------ buffers */

struct buf {
    char *p;
    size_t len, cap;
};

static void die_nomem(void);

static void buf_add(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            die_nomem();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) static void buf_fmt(struct buf *b, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0)
        buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A JSON string literal of n bytes of UTF-8 text. */
static void buf_json(struct buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    buf_add(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        buf_add(b, s + run, i - run);
        run = i + 1;
        char esc[7] = {'\\', (char)c, 0};
        if (c < 0x20) {
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
        }
        buf_add(b, esc, strlen(esc));
    }
    buf_add(b, s + run, n - run);
    buf_add(b, "\"", 1);
}

static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        unsigned int cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1, cp = c & 0x1f, min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, cp = c & 0x0f, min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        if (n - i <= k)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* ------------------------------------------------------------------ output */

static const char *command_name = "?";
static char version[8] = LATEST; /* the configuration's, once known: errors are in it */

static void write_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* nobody reads: nothing better to do */
        s += w;
        n -= (size_t)w;
    }
}

__attribute__((noreturn)) static void cni_error(int code, const char *msg, const char *details)
{
    struct buf out = {0};
    buf_str(&out, "{\"cniVersion\": ");
    buf_json(&out, version, strlen(version));
    buf_fmt(&out, ", \"code\": %d, \"msg\": ", code);
    buf_json(&out, msg, strlen(msg));
    if (details && *details) {
        buf_str(&out, ", \"details\": ");
        buf_json(&out, details, strlen(details));
    }
    buf_str(&out, "}\n");
    write_all(1, out.p, out.len);
    struct buf err = {0};
    buf_fmt(&err, "%s: %s failed: ", PLUGIN, command_name);
    buf_str(&err, msg);
    if (details && *details) {
        buf_str(&err, ": ");
        buf_str(&err, details);
    }
    buf_str(&err, "\n");
    write_all(2, err.p, err.len);
    exit(1);
}

static void die_nomem(void)
{
    static const char msg[] = "{\"cniVersion\": \"" LATEST "\", \"code\": 5, \"msg\": \"" PLUGIN
                              ": out of memory\"}\n";
    write_all(1, msg, sizeof msg - 1);
    _exit(1);
}

/* ------------------------------------------------------------------ time and I/O */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Wait for fd to be ready until deadline: 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, double deadline)
{
    for (;;) {
        double left = deadline - now();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

enum { READ_OK, READ_ERROR, READ_TOO_LONG, READ_TIMEOUT, READ_EOF };

/* Read into b until EOF (line == 0) or a newline (line == 1); at most limit bytes. */
static int read_bounded(int fd, struct buf *b, size_t limit, double deadline, int line)
{
    char chunk[65536];
    for (;;) {
        int r = wait_fd(fd, POLLIN, deadline);
        if (r <= 0)
            return r == 0 ? READ_TIMEOUT : READ_ERROR;
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0)
            return READ_ERROR;
        if (n == 0)
            return line ? READ_EOF : READ_OK;
        if (b->len + (size_t)n > limit)
            return READ_TOO_LONG;
        size_t start = b->len;
        buf_add(b, chunk, (size_t)n);
        if (line && memchr(b->p + start, '\n', (size_t)n))
            return READ_OK;
    }
}

/* ------------------------------------------------------------------ JSON */

struct json {
    const char *text;
    jsmntok_t *tok;
    int n;
};

/* Tokenize text, which must be one JSON object: 0, or -1. */
static int json_parse(struct json *j, const char *text, size_t len)
{
    jsmn_parser p;
    jsmn_init(&p);
    int n = jsmn_parse(&p, text, len, NULL, 0);
    j->text = text;
    j->tok = NULL;
    j->n = 0;
    if (n < 1)
        return -1;
    j->tok = calloc((size_t)n, sizeof *j->tok);
    if (!j->tok)
        die_nomem();
    jsmn_init(&p);
    if (jsmn_parse(&p, text, len, j->tok, (unsigned int)n) != n || j->tok[0].type != JSMN_OBJECT)
        return -1;
    j->n = n;
    for (size_t i = (size_t)j->tok[0].end; i < len; i++)
        if (!strchr(" \t\r\n", text[i]))
            return -1;
    return 0;
}

/* The value of a top-level key, or -1. A key written twice counts with its last
 * value, as the agent's JSON decoder (Python's) reads it: both must agree on the
 * socket to use. Tokens come in document order, so the next sibling of token i is
 * the first token that starts after i ends. */
static int json_get(const struct json *j, const char *key)
{
    size_t klen = strlen(key);
    int i = 1, found = -1;
    while (i + 1 < j->n) {
        const jsmntok_t *k = &j->tok[i];
        if (k->type == JSMN_STRING && (size_t)(k->end - k->start) == klen &&
            memcmp(j->text + k->start, key, klen) == 0)
            found = i + 1;
        int v = i + 1, end = j->tok[v].end;
        i = v + 1;
        while (i < j->n && j->tok[i].start < end)
            i++;
    }
    return found;
}

static int hexval(const char *s, unsigned int *out)
{
    *out = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        unsigned int d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
                         : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                         : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16;
        if (d > 15)
            return -1;
        *out = *out << 4 | d;
    }
    return 0;
}

static int json_string_raw(const struct json *j, int i, struct buf *out);

/* Decode string token i into out (NUL-terminated): 0, or -1 unless it is a valid
 * string of UTF-8 text (what is decoded may be printed: it must stay text). */
static int json_string(const struct json *j, int i, struct buf *out)
{
    if (json_string_raw(j, i, out) < 0 || !utf8_valid((const unsigned char *)out->p, out->len))
        return -1;
    return 0;
}

static int json_string_raw(const struct json *j, int i, struct buf *out)
{
    if (i < 0 || j->tok[i].type != JSMN_STRING)
        return -1;
    const char *s = j->text + j->tok[i].start, *end = j->text + j->tok[i].end;
    buf_add(out, "", 0);
    while (s < end) {
        const char *q = s;
        while (q < end && *q != '\\')
            q++;
        buf_add(out, s, (size_t)(q - s));
        if (q == end)
            break;
        if (end - q < 2)
            return -1;
        char c = q[1], lit = 0;
        s = q + 2;
        switch (c) {
        case '"': case '\\': case '/': lit = c; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            unsigned int cp, lo;
            if (end - s < 4 || hexval(s, &cp) < 0)
                return -1;
            s += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (end - s < 6 || s[0] != '\\' || s[1] != 'u' || hexval(s + 2, &lo) < 0 ||
                    lo < 0xdc00 || lo > 0xdfff)
                    return -1;
                s += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                return -1;
            }
            char u[4];
            size_t k;
            if (cp < 0x80) {
                u[0] = (char)cp, k = 1;
            } else if (cp < 0x800) {
                u[0] = (char)(0xc0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3f)), k = 2;
            } else if (cp < 0x10000) {
                u[0] = (char)(0xe0 | cp >> 12), u[1] = (char)(0x80 | (cp >> 6 & 0x3f));
                u[2] = (char)(0x80 | (cp & 0x3f)), k = 3;
            } else {
                u[0] = (char)(0xf0 | cp >> 18), u[1] = (char)(0x80 | (cp >> 12 & 0x3f));
                u[2] = (char)(0x80 | (cp >> 6 & 0x3f)), u[3] = (char)(0x80 | (cp & 0x3f)), k = 4;
            }
            buf_add(out, u, k);
            continue;
        }
        default:
            return -1;
        }
        buf_add(out, &lit, 1);
    }
    return 0;
}

/* A number token: 0 and *out, or -1 (booleans, null and strings are not numbers). */
static int json_number(const struct json *j, int i, double *out)
{
    if (i < 0 || j->tok[i].type != JSMN_PRIMITIVE)
        return -1;
    char tmp[64];
    int n = j->tok[i].end - j->tok[i].start;
    const char *s = j->text + j->tok[i].start;
    if (n <= 0 || n >= (int)sizeof tmp || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9')))
        return -1;
    memcpy(tmp, s, (size_t)n);
    tmp[n] = '\0';
    char *rest;
    errno = 0;
    *out = strtod(tmp, &rest);
    return *rest || errno ? -1 : 0;
}

static int json_bool(const struct json *j, int i)
{
    if (i < 0 || j->tok[i].type != JSMN_PRIMITIVE)
        return -1;
    const char *s = j->text + j->tok[i].start;
    int n = j->tok[i].end - j->tok[i].start;
    if (n == 4 && memcmp(s, "true", 4) == 0)
        return 1;
    if (n == 5 && memcmp(s, "false", 5) == 0)
        return 0;
    return -1;
}

/* ------------------------------------------------------------------ the agent */

struct agent {
    const char *socket;
    double timeout;
    struct buf reason; /* why it could not be asked */
};

/* A connected socket, or -1 with a->reason set. */
static int agent_connect(struct agent *a, double deadline)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(a->socket) >= sizeof addr.sun_path) {
        buf_fmt(&a->reason, "cannot connect to the agent socket %.200s...: path too long", a->socket);
        return -1;
    }
    strcpy(addr.sun_path, a->socket);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        buf_fmt(&a->reason, "cannot create a socket: %s", strerror(errno));
        return -1;
    }
    int r;
    while ((r = connect(fd, (struct sockaddr *)&addr, sizeof addr)) < 0 && (errno == EAGAIN || errno == EINTR)) {
        if (now() >= deadline)
            break; /* its backlog stayed full */
        usleep(10000);
    }
    if (r == 0)
        return fd;
    if (errno == EAGAIN || errno == EINTR) {
        buf_fmt(&a->reason, "the agent did not answer within %gs on %s", a->timeout, a->socket);
    } else {
        int e = errno;
        if (e == ENOENT)
            buf_fmt(&a->reason, "no agent socket at %s (is the svcproxy agent running on this node?)", a->socket);
        else if (e == ECONNREFUSED)
            buf_fmt(&a->reason, "the agent socket %s refuses connections (the svcproxy agent is not running)",
                    a->socket);
        else if (e == EACCES || e == EPERM)
            buf_fmt(&a->reason, "permission denied on the agent socket %s (the plugin must run as root)", a->socket);
        else
            buf_fmt(&a->reason, "cannot connect to the agent socket %s: %s", a->socket, strerror(e));
    }
    close(fd);
    return -1;
}

/* Connect, send the request, read one line: 0, or -1 with a->reason set. */
static int agent_exchange(struct agent *a, const struct buf *req, struct buf *answer)
{
    double deadline = now() + a->timeout;
    int fd = agent_connect(a, deadline), rc = -1, r;
    if (fd < 0)
        return -1;
    for (size_t sent = 0; sent < req->len;) {
        r = wait_fd(fd, POLLOUT, deadline);
        ssize_t n = r > 0 ? send(fd, req->p + sent, req->len - sent, MSG_NOSIGNAL) : -1;
        if (n < 0 && r > 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (r == 0) {
            buf_fmt(&a->reason, "the agent did not answer within %gs on %s", a->timeout, a->socket);
            goto out;
        }
        if (n < 0) {
            buf_fmt(&a->reason, "lost the connection to the agent on %s: %s", a->socket, strerror(errno));
            goto out;
        }
        sent += (size_t)n;
    }
    switch (read_bounded(fd, answer, MAX_ANSWER, deadline, 1)) {
    case READ_OK:
        rc = 0;
        break;
    case READ_TIMEOUT:
        buf_fmt(&a->reason, "the agent did not answer within %gs on %s", a->timeout, a->socket);
        break;
    case READ_EOF:
        buf_fmt(&a->reason, "the agent closed the connection on %s without answering", a->socket);
        break;
    case READ_TOO_LONG:
        buf_fmt(&a->reason, "the agent's answer on %s is too long", a->socket);
        break;
    default:
        buf_fmt(&a->reason, "lost the connection to the agent on %s: %s", a->socket, strerror(errno));
    }
out:
    close(fd);
    return rc;
}

/* "Pod NS/NAME" from CNI_ARGS, else "container ID": for messages. */
static void pod_name(struct buf *out)
{
    const char *args = getenv("CNI_ARGS"), *ns = "", *name = NULL;
    size_t nslen = 0, namelen = 0;
    for (const char *p = args ? args : ""; *p;) {
        const char *end = strchr(p, ';');
        if (!end)
            end = p + strlen(p);
        const char *eq = memchr(p, '=', (size_t)(end - p));
        if (eq) {
            const char *k = p, *v = eq + 1, *ke = eq, *ve = end;
            while (k < ke && *k == ' ') k++;
            while (ke > k && ke[-1] == ' ') ke--;
            while (v < ve && *v == ' ') v++;
            while (ve > v && ve[-1] == ' ') ve--;
            if (ke - k == 17 && memcmp(k, "K8S_POD_NAMESPACE", 17) == 0)
                ns = v, nslen = (size_t)(ve - v);
            else if (ke - k == 12 && memcmp(k, "K8S_POD_NAME", 12) == 0)
                name = v, namelen = (size_t)(ve - v);
        }
        p = *end ? end + 1 : end;
    }
    if (name && namelen) {
        buf_str(out, "Pod ");
        buf_add(out, ns, nslen);
        buf_str(out, "/");
        buf_add(out, name, namelen);
    } else {
        const char *id = getenv("CNI_CONTAINERID");
        buf_str(out, "container ");
        buf_str(out, id ? id : "");
    }
}

/* The agent could not be asked: what the command does then. */
__attribute__((noreturn)) static void unreachable(const struct command *cmd, const char *reason)
{
    struct buf msg = {0}, details = {0}, who = {0};
    const char *netns = getenv("CNI_NETNS");
    pod_name(&who);
    if (cmd->code == 0) {
        buf_fmt(&msg, "%s: %s ", PLUGIN, cmd->name);
        buf_str(&msg, who.p);
        buf_str(&msg, ": ");
        buf_str(&msg, reason);
        buf_str(&msg, "; the agent will forget the namespace when it is gone\n");
        write_all(2, msg.p, msg.len);
        exit(0);
    }
    if (cmd->code == ERR_NOT_AVAILABLE) {
        buf_str(&msg, "plugin not available: svcproxy agent unreachable: ");
        buf_str(&msg, reason);
        cni_error(cmd->code, msg.p, NULL);
    }
    buf_str(&msg, "svcproxy agent unavailable: ");
    buf_str(&msg, reason);
    if (strcmp(cmd->name, "ADD") == 0) {
        buf_str(&details, "the Services of ");
        buf_str(&details, who.p);
        buf_str(&details, " cannot be programmed in ");
        buf_str(&details, netns ? netns : "");
        buf_str(&details, " yet");
    }
    cni_error(cmd->code, msg.p, details.p);
}

/* Relay the agent's answer: its stdout, stderr and exit status. */
__attribute__((noreturn)) static void relay(const struct command *cmd, struct agent *a, const struct buf *line)
{
    struct json j;
    struct buf out = {0}, err = {0};
    size_t len = (size_t)((char *)memchr(line->p, '\n', line->len) - line->p);
    double rc;
    if (json_parse(&j, line->p, len) < 0)
        goto malformed;
    int ok = json_bool(&j, json_get(&j, "ok"));
    if (ok == 0) { /* the agent refused the invocation itself */
        double code;
        if (json_string(&j, json_get(&j, "error"), &err) < 0)
            goto malformed;
        buf_fmt(&a->reason, "the agent refused the request: %.4000s", err.p);
        if (cmd->code && json_number(&j, json_get(&j, "code"), &code) == 0 && code >= 1 && code < 1000 &&
            code == (int)code && cmd->code != ERR_NOT_AVAILABLE) {
            struct buf msg = {0};
            buf_str(&msg, "svcproxy agent: ");
            buf_str(&msg, err.p);
            cni_error((int)code, msg.p, NULL);
        }
        unreachable(cmd, a->reason.p);
    }
    if (ok != 1 || json_number(&j, json_get(&j, "rc"), &rc) < 0 || rc < 0 || rc > 255 || rc != (int)rc ||
        json_string(&j, json_get(&j, "stdout"), &out) < 0)
        goto malformed;
    int e = json_get(&j, "stderr");
    if (e >= 0 && json_string(&j, e, &err) < 0)
        goto malformed;
    write_all(1, out.p, out.len);
    if (e >= 0)
        write_all(2, err.p, err.len);
    exit((int)rc);
malformed:
    buf_fmt(&a->reason, "the agent's answer on %s is malformed: ", a->socket);
    for (size_t i = 0; i < len && i < 200; i++) { /* printable ASCII, else \xNN: always UTF-8 */
        unsigned char c = (unsigned char)line->p[i];
        if (c >= 0x20 && c < 0x7f)
            buf_add(&a->reason, line->p + i, 1);
        else
            buf_fmt(&a->reason, "\\x%02x", c);
    }
    unreachable(cmd, a->reason.p);
}

/* ------------------------------------------------------------------ commands */

static void version_answer(const char *stdin_text, size_t len)
{
    struct json j;
    struct buf v = {0}, out = {0};
    const char *chosen = LATEST;
    if (json_parse(&j, stdin_text, len) == 0 && json_string(&j, json_get(&j, "cniVersion"), &v) == 0)
        for (size_t i = 0; i < NSUPPORTED; i++)
            if (strcmp(v.p, supported[i]) == 0)
                chosen = supported[i];
    buf_fmt(&out, "{\"cniVersion\": \"%s\", \"supportedVersions\": [", chosen);
    for (size_t i = 0; i < NSUPPORTED; i++)
        buf_fmt(&out, "%s\"%s\"", i ? ", " : "", supported[i]);
    buf_str(&out, "]}\n");
    write_all(1, out.p, out.len);
    free(j.tok);
    free(v.p);
    free(out.p);
}

/* The socket and time limit from the configuration; errors are in its version. */
static void read_config(struct json *j, struct agent *a, struct buf *socket_path, const struct command *cmd)
{
    struct buf v = {0};
    if (json_string(j, json_get(j, "cniVersion"), &v) == 0)
        for (size_t i = 0; i < NSUPPORTED; i++)
            if (strcmp(v.p, supported[i]) == 0)
                strcpy(version, supported[i]);
    free(v.p);
    int s = json_get(j, "socket");
    a->socket = DEFAULT_SOCKET;
    if (s >= 0) {
        if (json_string(j, s, socket_path) < 0 || socket_path->p[0] != '/' ||
            strlen(socket_path->p) != socket_path->len)
            cni_error(ERR_INVALID_CONFIG, "socket must be an absolute path", NULL);
        a->socket = socket_path->p;
    }
    double t;
    a->timeout = DEFAULT_TIMEOUT; /* the agent reports a bad one */
    if (json_number(j, json_get(j, "timeout"), &t) == 0 && t > 0 && t <= 3600)
        a->timeout = t;
    if (cmd->code != ERR_TRY_AGAIN_LATER && a->timeout > DEL_TIMEOUT)
        a->timeout = DEL_TIMEOUT;
}

/* The request is over the agent's line limit: an environment variable is to blame
 * (CNI error 4, naming the largest) unless the configuration alone is too large. */
__attribute__((noreturn)) static void request_too_large(size_t config_len, const char *largest)
{
    if (config_len + 64 <= MAX_LINE && largest) {
        struct buf msg = {0};
        buf_fmt(&msg, "%s is too large to forward to the svcproxy agent (1 MiB at most for the request)", largest);
        cni_error(ERR_INVALID_ENV, msg.p, NULL);
    }
    cni_error(ERR_DECODE, "cannot decode the network configuration",
              "it is too large to forward to the svcproxy agent (1 MiB at most)");
}

static void build_request(struct buf *req, const char *stdin_text, size_t len)
{
    buf_str(req, "{\"op\":\"cni\",\"env\":{");
    int first = 1;
    const char *largest = NULL;
    size_t largest_len = 0;
    for (size_t i = 0; i < sizeof forwarded_env / sizeof forwarded_env[0]; i++) {
        const char *v = getenv(forwarded_env[i]);
        if (!v)
            continue;
        if (!utf8_valid((const unsigned char *)v, strlen(v))) {
            struct buf msg = {0};
            buf_fmt(&msg, "%s is not UTF-8 text", forwarded_env[i]);
            cni_error(ERR_INVALID_ENV, msg.p, NULL);
        }
        buf_str(req, first ? "\"" : ",\"");
        buf_str(req, forwarded_env[i]);
        buf_str(req, "\":");
        size_t before = req->len;
        buf_json(req, v, strlen(v));
        if (req->len - before > largest_len) { /* as escaped: what counts against the limit */
            largest = forwarded_env[i];
            largest_len = req->len - before;
        }
        first = 0;
    }
    buf_str(req, "},\"stdin\":");
    size_t env_len = req->len;
    buf_json(req, stdin_text, len);
    buf_str(req, "}\n");
    if (req->len > MAX_LINE)
        request_too_large(req->len - env_len, largest);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const char *name = getenv("CNI_COMMAND");
    if (!name || !*name)
        cni_error(ERR_INVALID_ENV, "required env variables [CNI_COMMAND] missing", NULL);
    command_name = name;
    const struct command *cmd = NULL;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(name, commands[i].name) == 0)
            cmd = &commands[i];
    if (!cmd && strcmp(name, "VERSION") != 0) {
        struct buf msg = {0};
        buf_str(&msg, "unknown CNI_COMMAND: ");
        buf_add(&msg, name, strnlen(name, 64));
        cni_error(ERR_INVALID_ENV, msg.p, NULL);
    }

    if (cmd) {
        struct buf missing = {0};
        for (const char *const *v = cmd->required; *v; v++) {
            const char *value = getenv(*v);
            if (!value || !*value) {
                buf_str(&missing, missing.len ? "," : "required env variables [");
                buf_str(&missing, *v);
            }
        }
        if (missing.len) {
            buf_str(&missing, "] missing");
            cni_error(ERR_INVALID_ENV, missing.p, NULL);
        }
    }

    struct buf in = {0};
    buf_add(&in, "", 0);
    switch (read_bounded(0, &in, MAX_LINE, now() + STDIN_TIMEOUT, 0)) {
    case READ_OK:
        break;
    case READ_TOO_LONG:
        cni_error(ERR_DECODE, "cannot decode the network configuration", "larger than 1 MiB");
    case READ_TIMEOUT:
        cni_error(ERR_IO, "timed out reading the network configuration on stdin", NULL);
    default:
        cni_error(ERR_IO, "cannot read the network configuration on stdin", strerror(errno));
    }
    if (!cmd) {
        version_answer(in.p, in.len);
        free(in.p);
        return 0;
    }

    struct json j;
    if (json_parse(&j, in.p, in.len) < 0)
        cni_error(ERR_DECODE, "cannot decode the network configuration", "not a JSON object");
    if (!utf8_valid((const unsigned char *)in.p, in.len))
        cni_error(ERR_DECODE, "cannot decode the network configuration", "not UTF-8 text");
    struct agent a = {0};
    struct buf socket_path = {0}, req = {0}, answer = {0};
    read_config(&j, &a, &socket_path, cmd);
    build_request(&req, in.p, in.len);
    if (agent_exchange(&a, &req, &answer) < 0)
        unreachable(cmd, a.reason.p);
    relay(cmd, &a, &answer);
}
