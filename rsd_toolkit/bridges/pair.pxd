# C types for the compiled build of pair.py (setup.py, Cython): the attributes every push reads. The .py is the
# source; without a build it runs as Python.


cdef class Pair:
    cdef public object bridge
    cdef public dict enc
    cdef public object _utf8
    cdef public bint _segment_start
    cdef public dict held
    cdef public str _held_text

    cpdef bint may_push(self, object side)
    cpdef object start(self, object side, Py_ssize_t token)
    cpdef object _plain(self, object side, object text)
