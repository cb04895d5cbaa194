/* The hot loops of the netlink backend, compiled: nlencode.Encoder.messages
 * (encode) and procfs.parse (proc_servers, at the end of this file).
 *
 * A full apply is NEW_SERVICE requests, then NEW_DEST requests for NAT real
 * servers, one per real server. Encoded in Python, under emulation the
 * encoding took as long as the kernel took to apply it, so the netlink backend
 * could not get near the kernel's own floor. This module encodes the usual
 * operations and nothing else:
 *
 *   ADD/EDIT_SERVICE of a TCP/UDP/SCTP service (not fwmark) whose settings
 *     the Python encoder has already encoded (they are looked up in its cache);
 *   ADD/EDIT_DESTINATION of a NAT real server with an IPv4 address, in such a
 *     service with an IPv4 address.
 *
 * It stops at the first operation that is anything else (another kind, a
 * value out of range, settings not cached yet, a value of any type but exactly
 * int or str, an attribute that raises an ordinary exception) and returns its
 * index: the Python encoder, which stays the reference, takes that one with
 * its checks and refusals, then calls again. What is not an ordinary
 * exception (MemoryError, KeyboardInterrupt, SystemExit) is raised. IPVS
 * attribute numbers and constant parts come from the caller (nlencode.py, as
 * byte strings); this file knows the netlink headers' layout, where the
 * caller's templates have their values, and adds the values: lengths,
 * sequence numbers, addresses, ports, weights.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

/* Attribute names, interned once (a lookup by C string makes a str each time). */
static PyObject *s_kind, *s_service, *s_destination, *s_forward, *s_weight, *s_port, *s_address, *s_fwmark,
    *s_protocol, *s_scheduler, *s_persistence, *s_flags, *s_active_conns, *s_inactive_conns;
/* object.__new__, which makes an instance without calling its __init__. */
static PyObject *object_new;

/* A service's identity attributes, as nlencode._SVC_IDENT packs them without the
 * nest header: AF (its value at 4), PROTOCOL (12), ADDR (20, 16 bytes), PORT
 * (40, big-endian). The caller's template has the attribute headers. */
#define IDENT_SIZE 44
#define IDENT_AF 4
#define IDENT_PROTOCOL 12
#define IDENT_ADDR 20
#define IDENT_PORT 40
/* After the service nest in NEW/SET_DEST: the destination nest header and the
 * ADDR header (8 bytes), the address (16), the run (PORT header, port at 4,
 * FWD_METHOD attribute, WEIGHT header: 20), the weight (4), the tail (U_THRESH,
 * L_THRESH, ADDR_FAMILY: 24). */
#define DEST_HEAD_SIZE 8
#define RUN_SIZE 20
#define RUN_PORT 4
#define TAIL_SIZE 24
#define NLMSG_SIZE 16
#define GENL_SIZE 4
#define MAX_PROTOCOLS 8

/* What the caller passes once per call (nlencode.Encoder._compiled_context). */
typedef struct {
    PyObject *add_svc, *edit_svc, *add_dest, *edit_dest, *masq, *protocols, *numbers, *udp, *settings;
    Py_ssize_t family, flags, nest_type;
    PyObject *svc_genl, *dest_genl, *ident, *dest_head, *run, *tail;
    long max_weight;
    uint16_t proto_numbers[MAX_PROTOCOLS];
} context;

static int
parse_context(PyObject *tuple, context *c)
{
    if (!PyArg_ParseTuple(tuple, "OOOOOO!O!OO!nnnO!O!SSSSl:context", &c->add_svc, &c->edit_svc, &c->add_dest,
                          &c->edit_dest, &c->masq, &PyTuple_Type, &c->protocols, &PyTuple_Type, &c->numbers, &c->udp,
                          &PyDict_Type, &c->settings, &c->family, &c->flags, &c->nest_type, &PyTuple_Type,
                          &c->svc_genl, &PyTuple_Type, &c->dest_genl, &c->ident, &c->dest_head, &c->run, &c->tail,
                          &c->max_weight)) {
        return 0;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(c->protocols);
    int ok = n <= MAX_PROTOCOLS && PyTuple_GET_SIZE(c->numbers) == n && c->family >= 0 && c->family <= 0xFFFF &&
             c->flags >= 0 && c->flags <= 0xFFFF && c->nest_type >= 0 && c->nest_type <= 0xFFFF &&
             PyBytes_GET_SIZE(c->ident) == IDENT_SIZE && PyBytes_GET_SIZE(c->dest_head) == DEST_HEAD_SIZE &&
             PyBytes_GET_SIZE(c->run) == RUN_SIZE && PyBytes_GET_SIZE(c->tail) == TAIL_SIZE &&
             c->max_weight >= 0 && c->max_weight <= 0xFFFFFFFFL;
    for (int k = 0; ok && k < 2; k++) {
        PyObject *a = PyTuple_GET_SIZE(c->svc_genl) == 2 ? PyTuple_GET_ITEM(c->svc_genl, k) : NULL;
        PyObject *b = PyTuple_GET_SIZE(c->dest_genl) == 2 ? PyTuple_GET_ITEM(c->dest_genl, k) : NULL;
        ok = a != NULL && b != NULL && PyBytes_Check(a) && PyBytes_Check(b) && PyBytes_GET_SIZE(a) == GENL_SIZE &&
             PyBytes_GET_SIZE(b) == GENL_SIZE;
    }
    for (Py_ssize_t k = 0; ok && k < n; k++) {
        long number = PyLong_AsLong(PyTuple_GET_ITEM(c->numbers, k));
        ok = number >= 0 && number <= 0xFFFF;
        c->proto_numbers[k] = (uint16_t)number;
    }
    if (!ok) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_nlfast.encode: malformed context");
        return 0;
    }
    return 1;
}

/* 1: obj.<name> is an int (exactly, or a bool) in [lo, hi]; 0: anything else,
 * with the attribute lookup's exception left set if it raised one. (A subclass
 * of int could change how Python packs it: that is the Python path's.) */
static int
get_long(PyObject *obj, PyObject *name, long lo, long hi, long *out)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) return 0;
    int ok = 0;
    if (PyLong_CheckExact(value) || PyBool_Check(value)) {
        int overflow = 0;
        long v = PyLong_AsLongAndOverflow(value, &overflow);
        if (!overflow && !(v == -1 && PyErr_Occurred()) && v >= lo && v <= hi) {
            *out = v;
            ok = 1;
        }
        PyErr_Clear();
    }
    Py_DECREF(value);
    return ok;
}

/* 1: obj.address is IP address text as socket.inet_pton takes it (IPv6 when it
 * has a colon, as nlencode decides); the family and 16 bytes, IPv4 zero-padded.
 * 0: anything else, an exception left set if one was raised. */
static int
get_address(PyObject *obj, uint16_t *af, unsigned char out[16])
{
    PyObject *value = PyObject_GetAttr(obj, s_address);
    if (value == NULL) return 0;
    int ok = 0;
    if (PyUnicode_CheckExact(value)) {
        Py_ssize_t size = 0;
        const char *text = PyUnicode_AsUTF8AndSize(value, &size); /* may raise (surrogates): left set */
        memset(out, 0, 16);
        if (text != NULL && (size_t)size == strlen(text)) {
            *af = strchr(text, ':') != NULL ? AF_INET6 : AF_INET;
            ok = inet_pton(*af, text, out) == 1;
        }
    }
    Py_DECREF(value);
    return ok;
}

/* 1: a service key svcproxy encodes here (fwmark 0, a known protocol, an
 * address, port 0..65535): its identity attributes, family, port, and
 * whether UDP. The protocol is compared by identity. */
static int
build_ident(const context *c, PyObject *key, unsigned char ident[IDENT_SIZE], uint16_t *af, long *port, int *udp)
{
    long fwmark;
    unsigned char addr[16];
    if (!get_long(key, s_fwmark, 0, 0, &fwmark) || !get_address(key, af, addr)) return 0;
    PyObject *protocol = PyObject_GetAttr(key, s_protocol);
    if (protocol == NULL) return 0;
    Py_ssize_t p = 0, n = PyTuple_GET_SIZE(c->protocols);
    while (p < n && PyTuple_GET_ITEM(c->protocols, p) != protocol) p++;
    *udp = protocol == c->udp;
    Py_DECREF(protocol);
    if (p == n || !get_long(key, s_port, 0, 65535, port)) return 0;
    unsigned char port_be[2] = {(unsigned char)(*port >> 8), (unsigned char)(*port & 0xFF)};
    memcpy(ident, PyBytes_AS_STRING(c->ident), IDENT_SIZE);
    memcpy(ident + IDENT_AF, af, 2);
    memcpy(ident + IDENT_PROTOCOL, &c->proto_numbers[p], 2);
    memcpy(ident + IDENT_ADDR, addr, 16);
    memcpy(ident + IDENT_PORT, port_be, 2);
    return 1;
}

/* The netlink header, genl header and service nest header: 24 bytes. */
static char *
put_heads(const context *c, char *m, Py_ssize_t total, unsigned long seq, PyObject *genl, Py_ssize_t nest_size)
{
    uint32_t len32 = (uint32_t)total, seq32 = (uint32_t)seq, zero = 0;
    uint16_t type16 = (uint16_t)c->family, flags16 = (uint16_t)c->flags, nest_len = (uint16_t)nest_size,
             nest_type = (uint16_t)c->nest_type;
    memcpy(m, &len32, 4); /* struct nlmsghdr, in native order as struct's "=" */
    memcpy(m + 4, &type16, 2);
    memcpy(m + 6, &flags16, 2);
    memcpy(m + 8, &seq32, 4);
    memcpy(m + 12, &zero, 4); /* port id 0: the kernel */
    memcpy(m + NLMSG_SIZE, PyBytes_AS_STRING(genl), GENL_SIZE);
    memcpy(m + NLMSG_SIZE + GENL_SIZE, &nest_len, 2); /* struct nlattr of the service nest */
    memcpy(m + NLMSG_SIZE + GENL_SIZE + 2, &nest_type, 2);
    return m + NLMSG_SIZE + GENL_SIZE + 4;
}

/* One NEW/SET_SERVICE message, or NULL: not this path (with an exception set if
 * a lookup raised one; encode decides what to do with it). */
static PyObject *
service_message(const context *c, PyObject *op, PyObject *kind, unsigned long seq)
{
    PyObject *key = NULL, *sched = NULL, *persistence = NULL, *opflags = NULL, *inputs = NULL, *settings = NULL,
             *message = NULL;
    unsigned char ident[IDENT_SIZE];
    uint16_t af;
    long port;
    int udp;
    if (!(key = PyObject_GetAttr(op, s_service)) || !build_ident(c, key, ident, &af, &port, &udp) ||
        !(sched = PyObject_GetAttr(op, s_scheduler)) || !(persistence = PyObject_GetAttr(op, s_persistence)) ||
        !(opflags = PyObject_GetAttr(op, s_flags))) {
        goto done;
    }
    /* The key of the Python encoder's settings cache (Encoder._service_settings). */
    PyObject *af_obj = PyLong_FromLong(af);
    if (af_obj == NULL) goto done;
    inputs = PyTuple_Pack(7, sched, persistence, opflags, af_obj, port == 0 ? Py_True : Py_False, Py_False,
                          udp ? Py_True : Py_False);
    Py_DECREF(af_obj);
    if (inputs == NULL) goto done;
    settings = PyDict_GetItemWithError(c->settings, inputs);
    if (settings == NULL || !PyBytes_CheckExact(settings)) { /* not cached yet: Python's turn */
        settings = NULL;
        goto done;
    }
    Py_INCREF(settings); /* held: the dict is the caller's */
    Py_ssize_t settings_size = PyBytes_GET_SIZE(settings), nest_size = 4 + IDENT_SIZE + settings_size;
    if (nest_size > 0xFFFF) goto done;
    Py_ssize_t total = NLMSG_SIZE + GENL_SIZE + nest_size;
    message = PyBytes_FromStringAndSize(NULL, total);
    if (message == NULL) goto done;
    char *m = put_heads(c, PyBytes_AS_STRING(message), total, seq,
                        PyTuple_GET_ITEM(c->svc_genl, kind == c->add_svc ? 0 : 1), nest_size);
    memcpy(m, ident, IDENT_SIZE);
    memcpy(m + IDENT_SIZE, PyBytes_AS_STRING(settings), (size_t)settings_size);
done:
    Py_XDECREF(settings);
    Py_XDECREF(inputs);
    Py_XDECREF(opflags);
    Py_XDECREF(persistence);
    Py_XDECREF(sched);
    Py_XDECREF(key);
    return message;
}

/* The service of the previous real server: most plans list a service's servers together. */
typedef struct {
    PyObject *key; /* a strong reference, or NULL */
    int usable;    /* an IPv4 service this file encodes servers of */
    unsigned char ident[IDENT_SIZE];
} last_service;

/* One NEW/SET_DEST message, or NULL, as service_message. */
static PyObject *
dest_message(const context *c, PyObject *op, PyObject *kind, unsigned long seq, last_service *last)
{
    PyObject *key = NULL, *dest = NULL, *forward = NULL, *message = NULL;
    if (!(key = PyObject_GetAttr(op, s_service))) goto done;
    if (key != last->key) {
        uint16_t af;
        long port;
        int udp;
        last->usable = build_ident(c, key, last->ident, &af, &port, &udp) && af == AF_INET;
        Py_XSETREF(last->key, Py_NewRef(key));
    }
    if (!last->usable) goto done;
    dest = PyObject_GetAttr(op, s_destination);
    if (dest == NULL || dest == Py_None) goto done;
    forward = PyObject_GetAttr(dest, s_forward);
    if (forward == NULL || forward != c->masq) goto done;
    long weight, port;
    uint16_t af;
    unsigned char addr[16];
    if (!get_long(dest, s_weight, 0, c->max_weight, &weight) || !get_long(dest, s_port, 0, 65535, &port) ||
        !get_address(dest, &af, addr) || af != AF_INET) {
        goto done;
    }
    Py_ssize_t nest_size = 4 + IDENT_SIZE;
    Py_ssize_t total = NLMSG_SIZE + GENL_SIZE + nest_size + DEST_HEAD_SIZE + 16 + RUN_SIZE + 4 + TAIL_SIZE;
    message = PyBytes_FromStringAndSize(NULL, total);
    if (message == NULL) goto done;
    char *m = put_heads(c, PyBytes_AS_STRING(message), total, seq,
                        PyTuple_GET_ITEM(c->dest_genl, kind == c->add_dest ? 0 : 1), nest_size);
    uint32_t weight32 = (uint32_t)weight;
    unsigned char port_be[2] = {(unsigned char)(port >> 8), (unsigned char)(port & 0xFF)};
    memcpy(m, last->ident, IDENT_SIZE);
    m += IDENT_SIZE;
    memcpy(m, PyBytes_AS_STRING(c->dest_head), DEST_HEAD_SIZE);
    m += DEST_HEAD_SIZE;
    memcpy(m, addr, 16);
    m += 16;
    memcpy(m, PyBytes_AS_STRING(c->run), RUN_SIZE);
    memcpy(m + RUN_PORT, port_be, 2);
    m += RUN_SIZE;
    memcpy(m, &weight32, 4); /* native order, as struct's "=I" */
    m += 4;
    memcpy(m, PyBytes_AS_STRING(c->tail), TAIL_SIZE);
done:
    Py_XDECREF(forward);
    Py_XDECREF(dest);
    Py_XDECREF(key);
    return message;
}

/* encode(ops, start, seq, out, context) -> (next index, next sequence number)
 *
 * Appends to `out` one complete message, numbered from `seq`, per operation
 * from ops[start] on, while each is one this file encodes (see the top); the
 * index returned is that of the first that is not (len(ops) when all were). */
static PyObject *
encode(PyObject *self, PyObject *args)
{
    PyObject *ops, *out, *ctx;
    Py_ssize_t start, first_seq;
    context c;
    if (!PyArg_ParseTuple(args, "O!nnO!O!:encode", &PyList_Type, &ops, &start, &first_seq, &PyList_Type, &out,
                          &PyTuple_Type, &ctx) ||
        !parse_context(ctx, &c)) {
        return NULL;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "_nlfast.encode: negative start");
        return NULL;
    }
    if (first_seq < 0 || first_seq > 0xFFFFFFFFL) {
        PyErr_SetString(PyExc_ValueError, "_nlfast.encode: seq out of range 0..2**32-1");
        return NULL;
    }
    unsigned long seq = (unsigned long)first_seq;
    last_service last = {NULL, 0, {0}};
    Py_ssize_t i = start;
    int failed = 0;
    /* (The caller numbers a batch so that it does not pass 2**32 - 1; stopping
     * there anyway keeps a list grown meanwhile from wrapping here.) */
    while (i < PyList_GET_SIZE(ops) && seq <= 0xFFFFFFFFUL) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        Py_INCREF(op);
        PyObject *message = NULL;
        PyObject *kind = PyObject_GetAttr(op, s_kind);
        if (kind == c.add_svc || kind == c.edit_svc) {
            message = service_message(&c, op, kind, seq);
        } else if (kind != NULL && (kind == c.add_dest || kind == c.edit_dest)) {
            message = dest_message(&c, op, kind, seq, &last);
        }
        Py_XDECREF(kind);
        Py_DECREF(op);
        if (message == NULL) {
            /* Not ours. An ordinary exception from a lookup is the Python path's to
             * raise again (or not); memory errors and interrupts are raised now. */
            if (PyErr_Occurred()) {
                if (PyErr_ExceptionMatches(PyExc_Exception) && !PyErr_ExceptionMatches(PyExc_MemoryError)) {
                    PyErr_Clear();
                } else {
                    failed = 1;
                }
            }
            break;
        }
        int appended = PyList_Append(out, message);
        Py_DECREF(message);
        if (appended < 0) {
            failed = 1;
            break;
        }
        i += 1;
        seq += 1;
    }
    Py_XDECREF(last.key);
    if (failed) return NULL;
    return Py_BuildValue("(nk)", i, seq);
}

/* ---------------------------------------------------------------- /proc/net/ip_vs
 *
 * The netlink backend reads real servers from this file (procfs.py), one line
 * per real server; parsed in Python that was most of a read under emulation.
 * This parses the usual file and nothing else:
 * plain ASCII, words separated by spaces or tabs, service lines of at least
 * three words, real-server lines "-> ADDRESS:PORT FORWARD WEIGHT ACTIVE
 * INACTIVE" with a four-digit hexadecimal port, a forwarding name it is given
 * and unsigned decimal counts. On anything else it returns None and
 * procfs.parse, the reference, reads the text itself (and raises what it
 * raises). Real servers are made as nldecode.make_destination makes them:
 * object.__new__ and object.__setattr__ of each field, no __init__.
 */

#define MAX_WORDS 8
#define PORT_CACHE 64

typedef struct {
    const char *start;
    Py_ssize_t size;
} word;

/* The words of one line (at most MAX_WORDS + 1 are counted); -1: a byte this
 * parser does not take (the caller returns None). */
static int
split_words(const char *p, const char *end, word *words)
{
    int n = 0;
    while (p < end) {
        unsigned char ch = (unsigned char)*p;
        if (ch == ' ' || ch == '\t') {
            p++;
            continue;
        }
        if (ch < 0x21 || ch > 0x7e) return -1;
        const char *w = p;
        while (p < end && (unsigned char)*p > 0x20 && (unsigned char)*p < 0x7f) p++;
        if (p < end && *p != ' ' && *p != '\t') return -1;
        if (n < MAX_WORDS) {
            words[n].start = w;
            words[n].size = p - w;
        }
        n++;
    }
    return n;
}

static int
hex_value(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

/* An unsigned decimal count as a new int, or NULL (an exception set only when
 * allocation failed). */
static PyObject *
decimal(const word *w, int *bad)
{
    if (w->size < 1 || w->size > 18) {
        *bad = 1;
        return NULL;
    }
    long long v = 0;
    for (Py_ssize_t k = 0; k < w->size; k++) {
        char ch = w->start[k];
        if (ch < '0' || ch > '9') {
            *bad = 1;
            return NULL;
        }
        v = v * 10 + (ch - '0');
    }
    return PyLong_FromLongLong(v);
}

/* proc_servers(text, cls, forwards, convert) -> {(word0, word1): [cls, ...]} or None
 *
 * `text` is the whole file (its three header lines already checked by the
 * caller); `forwards` a tuple of (name, Forward) pairs; `convert(address_text)`
 * turns an address that is not 8 hexadecimal digits (IPv6, "[...]") into the
 * model's text, raising if it cannot. */
static PyObject *
proc_servers(PyObject *self, PyObject *args)
{
    PyObject *text, *cls, *forwards, *convert;
    if (!PyArg_ParseTuple(args, "UO!O!O:proc_servers", &text, &PyType_Type, &cls, &PyTuple_Type, &forwards,
                          &convert)) {
        return NULL;
    }
    Py_ssize_t nforwards = PyTuple_GET_SIZE(forwards);
    for (Py_ssize_t k = 0; k < nforwards; k++) {
        PyObject *pair = PyTuple_GET_ITEM(forwards, k);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0))) {
            PyErr_SetString(PyExc_TypeError, "proc_servers: forwards must be (name, value) pairs");
            return NULL;
        }
    }
    /* Not plain ASCII (a surrogate, U+FFFD from a replaced byte): Python's turn,
     * without making a UTF-8 copy of the text. */
    if (!PyUnicode_IS_ASCII(text)) Py_RETURN_NONE;
    const char *p = (const char *)PyUnicode_1BYTE_DATA(text);
    const char *end = p + PyUnicode_GET_LENGTH(text);
    PyObject *result = PyDict_New(), *names = PyDict_New(), *current = NULL;
    PyObject *port_key[PORT_CACHE] = {NULL};
    long port_num[PORT_CACHE];
    int ok = result != NULL && names != NULL, unusual = 0;
    Py_ssize_t lines = 0;
    while (ok && !unusual && p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL) eol = end;
        const char *line = p;
        p = eol < end ? eol + 1 : end;
        if (lines < 3) { /* the header, checked by the caller */
            lines++;
            continue;
        }
        word w[MAX_WORDS];
        int n = split_words(line, eol, w);
        if (n == 0) continue;
        if (n < 0 || n > MAX_WORDS) {
            unusual = 1;
            break;
        }
        if (w[0].size == 2 && w[0].start[0] == '-' && w[0].start[1] == '>') {
            if (current == NULL || n != 6) {
                unusual = 1;
                break;
            }
            /* ADDRESS:PORT, split at the last colon */
            const char *ap = w[1].start;
            Py_ssize_t colon = w[1].size - 1;
            while (colon >= 0 && ap[colon] != ':') colon--;
            if (colon < 0 || w[1].size - colon - 1 != 4) {
                unusual = 1;
                break;
            }
            long port = 0;
            for (int k = 1; k <= 4; k++) {
                int h = hex_value(ap[colon + k]);
                if (h < 0) unusual = 1;
                port = port * 16 + h;
            }
            if (unusual) break;
            PyObject *forward = NULL;
            for (Py_ssize_t k = 0; k < nforwards; k++) {
                PyObject *pair = PyTuple_GET_ITEM(forwards, k);
                Py_ssize_t name_size;
                const char *name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(pair, 0), &name_size);
                if (name == NULL) {
                    ok = 0;
                    break;
                }
                if (name_size == w[2].size && memcmp(name, w[2].start, (size_t)name_size) == 0) {
                    forward = PyTuple_GET_ITEM(pair, 1);
                    break;
                }
            }
            if (!ok) break;
            if (forward == NULL) {
                unusual = 1;
                break;
            }
            /* The address text, converted once per distinct address. */
            PyObject *token = PyUnicode_FromStringAndSize(ap, colon);
            if (token == NULL) {
                ok = 0;
                break;
            }
            PyObject *address = PyDict_GetItemWithError(names, token); /* borrowed, held by names */
            if (address == NULL && !PyErr_Occurred()) {
                PyObject *made = NULL;
                if (colon == 8) {
                    /* dotted decimal, as inet_ntop writes it (which goes through sprintf) */
                    char buf[16];
                    int len = 0;
                    for (int k = 0; k < 4 && !unusual; k++) {
                        int hi = hex_value(ap[2 * k]), lo = hex_value(ap[2 * k + 1]);
                        if (hi < 0 || lo < 0) {
                            unusual = 1;
                            break;
                        }
                        int octet = hi * 16 + lo;
                        if (k) buf[len++] = '.';
                        if (octet >= 100) buf[len++] = (char)('0' + octet / 100);
                        if (octet >= 10) buf[len++] = (char)('0' + octet / 10 % 10);
                        buf[len++] = (char)('0' + octet % 10);
                    }
                    if (!unusual) made = PyUnicode_FromStringAndSize(buf, len);
                } else {
                    made = PyObject_CallOneArg(convert, token);
                    if (made == NULL || !PyUnicode_CheckExact(made)) {
                        /* Python's parser decides what that address is worth. */
                        if (made == NULL && PyErr_ExceptionMatches(PyExc_Exception) &&
                            !PyErr_ExceptionMatches(PyExc_MemoryError)) {
                            PyErr_Clear();
                        } else if (made == NULL) {
                            ok = 0;
                        }
                        Py_XDECREF(made);
                        made = NULL;
                        unusual = 1;
                    }
                }
                if (made != NULL) {
                    if (PyDict_SetItem(names, token, made) < 0) ok = 0;
                    address = made;
                    Py_DECREF(made); /* names holds it */
                }
            }
            Py_DECREF(token);
            if (PyErr_Occurred() && ok) ok = 0;
            if (!ok || unusual) break;
            /* The port as an int shared by the servers of one port (memory). */
            int slot = (int)(port % PORT_CACHE);
            if (port_key[slot] == NULL || port_num[slot] != port) {
                PyObject *made = PyLong_FromLong(port);
                if (made == NULL) {
                    ok = 0;
                    break;
                }
                Py_XSETREF(port_key[slot], made);
                port_num[slot] = port;
            }
            int bad = 0;
            PyObject *weight = decimal(&w[3], &bad), *active = decimal(&w[4], &bad), *inactive = decimal(&w[5], &bad);
            PyObject *dest = NULL;
            if (weight != NULL && active != NULL && inactive != NULL) {
                dest = PyObject_CallOneArg(object_new, cls);
                if (dest != NULL &&
                    (PyObject_GenericSetAttr(dest, s_address, address) < 0 ||
                     PyObject_GenericSetAttr(dest, s_port, port_key[slot]) < 0 ||
                     PyObject_GenericSetAttr(dest, s_weight, weight) < 0 ||
                     PyObject_GenericSetAttr(dest, s_forward, forward) < 0 ||
                     PyObject_GenericSetAttr(dest, s_active_conns, active) < 0 ||
                     PyObject_GenericSetAttr(dest, s_inactive_conns, inactive) < 0 ||
                     PyList_Append(current, dest) < 0)) {
                    ok = 0;
                }
                if (dest == NULL) ok = 0;
            } else if (bad && !PyErr_Occurred()) {
                unusual = 1;
            } else {
                ok = 0;
            }
            Py_XDECREF(dest);
            Py_XDECREF(weight);
            Py_XDECREF(active);
            Py_XDECREF(inactive);
        } else {
            if (n < 3) {
                unusual = 1;
                break;
            }
            PyObject *key = Py_BuildValue("(s#s#)", w[0].start, w[0].size, w[1].start, w[1].size);
            if (key == NULL) {
                ok = 0;
                break;
            }
            int listed = PyDict_Contains(result, key);
            PyObject *servers = listed == 0 ? PyList_New(0) : NULL;
            if (listed == 1) unusual = 1; /* listed twice: the table changed while read */
            else if (servers == NULL || PyDict_SetItem(result, key, servers) < 0) ok = 0;
            Py_DECREF(key);
            current = servers; /* borrowed from here on: result holds it */
            Py_XDECREF(servers);
        }
    }
    for (int k = 0; k < PORT_CACHE; k++) Py_XDECREF(port_key[k]);
    Py_XDECREF(names);
    if (!ok || unusual) {
        Py_XDECREF(result);
        if (!ok) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "proc_servers failed without an error");
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(ops, start, seq, out, context) -> (next index, next seq): the usual operations, compiled."},
    {"proc_servers", proc_servers, METH_VARARGS,
     "proc_servers(text, cls, forwards, convert) -> real servers by service label, or None: the usual file."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_nlfast", "The compiled hot loops of nlencode.Encoder.messages and procfs.parse.", -1, methods,
};

PyMODINIT_FUNC
PyInit__nlfast(void)
{
    if (!(s_kind = PyUnicode_InternFromString("kind")) || !(s_service = PyUnicode_InternFromString("service")) ||
        !(s_destination = PyUnicode_InternFromString("destination")) ||
        !(s_forward = PyUnicode_InternFromString("forward")) || !(s_weight = PyUnicode_InternFromString("weight")) ||
        !(s_port = PyUnicode_InternFromString("port")) || !(s_address = PyUnicode_InternFromString("address")) ||
        !(s_fwmark = PyUnicode_InternFromString("fwmark")) || !(s_protocol = PyUnicode_InternFromString("protocol")) ||
        !(s_scheduler = PyUnicode_InternFromString("scheduler")) ||
        !(s_persistence = PyUnicode_InternFromString("persistence")) ||
        !(s_flags = PyUnicode_InternFromString("flags")) ||
        !(s_active_conns = PyUnicode_InternFromString("active_conns")) ||
        !(s_inactive_conns = PyUnicode_InternFromString("inactive_conns")) ||
        !(object_new = PyObject_GetAttrString((PyObject *)&PyBaseObject_Type, "__new__"))) {
        return NULL;
    }
    return PyModule_Create(&module);
}
