"""`python -m tf_proxynorm.build`: builds the fused op library.

An entry point only, kept at the top level for the command's short name: the compiler
driver is `tf_proxynorm.fused.build` (and the cache it fills, `tf_proxynorm.fused.cache`).
"""

import sys

from tf_proxynorm.fused.build import main

if __name__ == "__main__":
    sys.exit(main())
