"""The .lc bitstream: everything that defines the bytes of a file. Specified in `SPEC.md`.

* `container` -- header, payload and CRC32 (no torch, no constriction: cheap to import);
* `tables`    -- the frozen integer entropy tables (`CdfTables`) and how they are built;
* `range_coder` -- symbols + tables <-> payload bytes; the only user of `constriction`.

Import the submodule you need; this package re-exports nothing, so that
reading a header never loads the entropy coder.
"""
