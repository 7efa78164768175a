/* netprobe._pump: the echo server's raw echo in C (Linux; optional, see netprobe/server.py).
 *
 * One call serves every ready socket of an epoll set: it reads what each socket holds, adds the
 * bytes to the connection's counters, and writes them all back at the end. Whatever is not that
 * plain echo (an error, EOF, a chunk over the connection's limit, a write the kernel could not
 * take whole) is read no further and handed back to Python in a report, which runs the same
 * code as on the event loop's own transports. Measured by scripts/bench_echo.py (100 clients
 * ping-pong): the Python per-message path cost about 2 us of user CPU per message, this about
 * a tenth of that.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>

/* The kinds of report: run()'s docstring says what each carries. */
enum { K_EVENT = 0, K_READ_ERROR = 1, K_EOF = 2, K_OVER = 3, K_KEEP = 4, K_SEND_ERROR = 5,
       K_ECHOED = 6, K_FAILED = 7 };

#define MAX_EVENTS 1024

static PyObject *s_bytes_in, *s_bytes_out, *s_last_rx, *s_echo_limit;

static int add_count(PyObject *conn, PyObject *name, Py_ssize_t n) {
    PyObject *old = PyObject_GetAttr(conn, name);
    if (old == NULL) return -1;
    PyObject *delta = PyLong_FromSsize_t(n);
    if (delta == NULL) {
        Py_DECREF(old);
        return -1;
    }
    PyObject *sum = PyNumber_Add(old, delta);
    Py_DECREF(old);
    Py_DECREF(delta);
    if (sum == NULL) return -1;
    int rc = PyObject_SetAttr(conn, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* Appends (fd, kind, value) to out; takes the reference to value. */
static int report(PyObject *out, int fd, int kind, PyObject *value) {
    if (value == NULL) return -1;
    PyObject *item = Py_BuildValue("(iiN)", fd, kind, value);
    if (item == NULL) return -1;
    int rc = PyList_Append(out, item);
    Py_DECREF(item);
    return rc;
}

static int is_retry(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }

/* A chunk read in this batch, to be written back at its end. */
struct held {
    int fd;
    size_t offset;
    size_t size;
};

/* Writes back every held chunk, in the order they were read. */
static int write_held(PyObject *out, char *data, struct held *held, int count, int lone_fd) {
    for (int i = 0; i < count; i++) {
        struct held *h = &held[i];
        ssize_t sent = send(h->fd, data + h->offset, h->size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (!is_retry(errno)) {
                if (report(out, h->fd, K_SEND_ERROR, PyLong_FromLong(errno)) < 0) return -1;
                continue;
            }
            sent = 0;
        }
        if ((size_t)sent < h->size) {
            PyObject *rest = PyBytes_FromStringAndSize(data + h->offset + sent,
                                                       (Py_ssize_t)(h->size - (size_t)sent));
            if (report(out, h->fd, K_KEEP, rest) < 0) return -1;
        } else if (h->fd == lone_fd) {
            if (report(out, h->fd, K_ECHOED, PyLong_FromSize_t(h->size)) < 0) return -1;
        }
    }
    return 0;
}

/* Reads one chunk of fd into at (room bytes) and counts it: returns its size when it is to be
   written back, 0 when it was reported instead (or nothing was there), -1 on an exception. */
static Py_ssize_t serve(PyObject *out, PyObject *conn, int fd, char *at, size_t room,
                        PyObject *now) {
    /* The limit before the read: an exception here leaves the bytes in the kernel. */
    PyObject *limit_obj = PyObject_GetAttr(conn, s_echo_limit);
    if (limit_obj == NULL) return -1;
    int overflow;
    long long limit = PyLong_AsLongLongAndOverflow(limit_obj, &overflow);
    Py_DECREF(limit_obj);
    if (limit == -1 && PyErr_Occurred()) return -1;
    if (overflow) /* a Python int of any size is a limit, as on the loop's path */
        limit = overflow > 0 ? LLONG_MAX : -1;
    ssize_t got = recv(fd, at, room, MSG_DONTWAIT);
    if (got < 0) {
        if (is_retry(errno)) return 0;
        return report(out, fd, K_READ_ERROR, PyLong_FromLong(errno));
    }
    if (got == 0) /* EOF stays readable: reported, not taken */
        return report(out, fd, K_EOF, Py_NewRef(Py_None));
    if (got > limit)
        return report(out, fd, K_OVER, PyBytes_FromStringAndSize(at, got));
    /* Counted at the read, as Connection.data_received counts: bytes_out is what was
       written, sent or handed to the transport's buffer. */
    if (add_count(conn, s_bytes_in, got) < 0 || add_count(conn, s_bytes_out, got) < 0)
        return -1;
    if (now != Py_None && PyObject_SetAttr(conn, s_last_rx, now) < 0) return -1;
    /* Written at the end of the batch: a client waiting on several of these replies is
       woken once for them all, as with Server._write_replies on the Python path. */
    return got;
}

static PyObject *pump_run(PyObject *Py_UNUSED(module), PyObject *args) {
    int epfd, max_events, lone_fd;
    PyObject *conns, *now;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iO!w*iOi:run", &epfd, &PyDict_Type, &conns, &buf, &max_events,
                          &now, &lone_fd))
        return NULL;
    if (buf.len < 2) { /* half of it is offered to each read: a read of 0 bytes is an EOF */
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "run() buffer must hold at least 2 bytes");
        return NULL;
    }
    if (max_events < 1 || max_events > MAX_EVENTS) max_events = MAX_EVENTS;
    struct epoll_event events[MAX_EVENTS];
    struct held held[MAX_EVENTS];
    int held_count = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL) goto fail;
    /* Never blocks (timeout 0): the event loop has seen the set readable. */
    int n = epoll_wait(epfd, events, max_events, 0);
    if (n < 0) {
        if (errno == EINTR) n = 0;
        else {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
    }
    char *data = buf.buf;
    /* Every read is offered half the buffer (what uvloop reads per call: the same chunks,
       so the same --max-frame verdicts); the other half lets reads pile up. */
    size_t chunk = (size_t)buf.len / 2;
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        PyObject *key = PyLong_FromLong(fd);
        if (key == NULL) goto fail;
        PyObject *conn = PyDict_GetItemWithError(conns, key);
        Py_DECREF(key);
        if (conn == NULL) {
            if (PyErr_Occurred()) goto fail;
            continue;
        }
        if (events[i].events & ~(uint32_t)EPOLLIN) {
            /* EPOLLERR/EPOLLHUP: the loop's transport reads the socket's error itself. */
            if (report(out, fd, K_EVENT, Py_NewRef(Py_None)) < 0) goto fail;
            continue;
        }
        if (used + chunk > (size_t)buf.len) {
            if (write_held(out, data, held, held_count, lone_fd) < 0) goto fail;
            held_count = 0;
            used = 0;
        }
        /* Our own reference: the attribute calls below may run Python code (a property, a
           collection's finalizers) that takes conn out of conns, its last reference. */
        Py_INCREF(conn);
        ssize_t got = serve(out, conn, fd, data + used, chunk, now);
        Py_DECREF(conn);
        if (got < 0) {
            /* The connection's own attributes failed (no memory, or not what a Connection
               holds): it alone ends, as a failed handler's connection does; the others of
               this batch are served on, and their held chunks still go out. */
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            if (value == NULL) value = Py_NewRef(Py_None);
            if (report(out, fd, K_FAILED, value) < 0) goto fail;
            continue;
        }
        if (got > 0) {
            held[held_count++] = (struct held){fd, used, (size_t)got};
            used += (size_t)got;
        }
    }
    if (write_held(out, data, held, held_count, lone_fd) < 0) goto fail;
    PyBuffer_Release(&buf);
    return out;
fail:
    PyBuffer_Release(&buf);
    Py_XDECREF(out);
    return NULL;
}

PyDoc_STRVAR(run_doc,
"run(epfd, conns, buffer, max_events, now, lone_fd) -> list[tuple[int, int, object]]\n\n"
"Serve the ready sockets of epoll set epfd (one epoll_wait, timeout 0). conns maps each fd in\n"
"the set to its Connection. Each read is offered half of buffer; a chunk of at most\n"
"conn._echo_limit bytes is counted (bytes_in, bytes_out; _last_rx = now unless now is None)\n"
"and written back, all of the batch's chunks together at its end.\n"
"Reports (fd, kind, value), kind: 0 EPOLLERR/EPOLLHUP (None; nothing read), 1 read error\n"
"(errno), 2 EOF (None; not taken), 3 a chunk over the limit (its bytes, not counted), 4 a\n"
"write the kernel took part of (the bytes left, counted), 5 write error (errno, counted),\n"
"6 echoed on lone_fd (the size), 7 the connection's attributes failed (the exception; what\n"
"was read from it is lost).");

static PyMethodDef methods[] = {
    {"run", pump_run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pump", "netprobe's raw echo in C (see run).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pump(void) {
    s_bytes_in = PyUnicode_InternFromString("bytes_in");
    s_bytes_out = PyUnicode_InternFromString("bytes_out");
    s_last_rx = PyUnicode_InternFromString("_last_rx");
    s_echo_limit = PyUnicode_InternFromString("_echo_limit");
    if (s_bytes_in == NULL || s_bytes_out == NULL || s_last_rx == NULL || s_echo_limit == NULL)
        return NULL;
    return PyModule_Create(&module);
}
