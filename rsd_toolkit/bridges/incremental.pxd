# C types for the compiled build of incremental.py (setup.py, Cython): the attributes every push reads, the
# locals of the hot paths, and the small helpers as C-callable methods (cpdef: Python calls them as before).
# The .py is the source; without a build it runs as Python.
cimport cython


cdef class IncrementalEncoder:
    cdef public object vocab
    cdef public object _unicode_form
    cdef public tuple _sealed
    cdef public object _ids
    cdef public Py_ssize_t _seg0
    cdef public object _ends
    cdef public bytearray _text
    cdef public Py_ssize_t _raw_len
    cdef public Py_ssize_t _last_stable
    cdef public bint _mid
    cdef public Py_ssize_t _next_seal
    cdef public bint _whole

    @cython.locals(n_old=Py_ssize_t, lcp=Py_ssize_t, limit=Py_ssize_t, rel=Py_ssize_t, raw=Py_ssize_t,
                   prev=Py_ssize_t, latest=Py_ssize_t, k=Py_ssize_t, i=Py_ssize_t, seg0=Py_ssize_t,
                   starts=bytearray, words=bytearray, lens=list)
    cpdef object _splice(self, Py_ssize_t start, object new_tail)

    @cython.locals(old_len=Py_ssize_t, lead=Py_ssize_t, last=Py_ssize_t, junction=bint, c=Py_ssize_t, start=Py_ssize_t)
    cpdef object start_text(self, object text)

    cpdef bint _stable(self, Py_ssize_t i)
    cpdef bint _needs_no_check(self, Py_ssize_t i, Py_ssize_t lead)
    @cython.locals(last=Py_ssize_t)
    cpdef bint _word_before(self, Py_ssize_t pos)
    cpdef bint _in_long_run(self)
    @cython.locals(pos=Py_ssize_t, b=Py_ssize_t, cp=Py_ssize_t, buf=bytearray)
    cpdef bint _char_start(self, Py_ssize_t raw, Py_ssize_t lead)
    @cython.locals(anchor=Py_ssize_t, bound=Py_ssize_t, i=Py_ssize_t, start=Py_ssize_t, seg0=Py_ssize_t,
                   in_run=bint, runs=bint, starts_space=bytearray, ends_word=bytearray, out=list)
    cpdef list _cuts(self, Py_ssize_t lead, Py_ssize_t most)
    @cython.locals(start=Py_ssize_t)
    cpdef bint _agrees(self, Py_ssize_t c, Py_ssize_t later, object new_tail)
    cpdef object _encode_from(self, Py_ssize_t c, Py_ssize_t lead, object end=*)
    @cython.locals(i=Py_ssize_t)
    cpdef Py_ssize_t _stable_before(self, Py_ssize_t rel)
