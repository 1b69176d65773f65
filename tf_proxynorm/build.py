"""`python -m tf_proxynorm.build`: builds the fused op library (see `tf_proxynorm.fused.build`)."""

import sys

from tf_proxynorm.fused.build import main

if __name__ == "__main__":
    sys.exit(main())
