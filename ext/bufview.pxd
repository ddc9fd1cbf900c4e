# Zero-copy access to any object that supports the buffer protocol
# (bytes, bytearray, memoryview, mmap, array.array, ...).
#
# Buffers are requested with PyBUF_SIMPLE: one contiguous run of bytes,
# whatever the exporter's item format, and read-only exporters are fine.
# The caller must PyBuffer_Release() the view (try/finally).
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)


cdef inline int acquire_read(object obj, Py_buffer *view, str what) except -1:
    """Fill *view* with a read-only, C-contiguous byte view of *obj*.

    Raises TypeError if *obj* does not support the buffer protocol and
    ValueError if its buffer is not C-contiguous.
    """
    if not PyObject_CheckBuffer(obj):
        raise TypeError(
            f"{what} must be a bytes-like object (buffer protocol), not {type(obj).__name__}")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except BufferError as exc:
        raise ValueError(f"{what} must be a C-contiguous buffer ({exc})") from None
    return 0


cdef inline int acquire_write(object obj, Py_buffer *view, str what) except -1:
    """Fill *view* with a writable, C-contiguous byte view of *obj*.

    Raises TypeError if *obj* is not a buffer or is read-only, and
    ValueError if its buffer is not C-contiguous.
    """
    cdef Py_buffer probe
    if not PyObject_CheckBuffer(obj):
        raise TypeError(
            f"{what} must be a writable bytes-like object (buffer protocol), not {type(obj).__name__}")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_WRITABLE)
        return 0
    except BufferError:
        pass
    # Tell "read-only" apart from "not contiguous".
    try:
        PyObject_GetBuffer(obj, &probe, PyBUF_SIMPLE)
    except BufferError as exc:
        raise ValueError(f"{what} must be a C-contiguous buffer ({exc})") from None
    PyBuffer_Release(&probe)
    raise TypeError(f"{what} must be a writable buffer, {type(obj).__name__} is read-only")


cdef inline bint overlaps(const Py_buffer *a, const Py_buffer *b) noexcept:
    """True if the two views share any byte."""
    cdef const char *pa = <const char *>a.buf
    cdef const char *pb = <const char *>b.buf
    return a.len > 0 and b.len > 0 and pa < pb + b.len and pb < pa + a.len
