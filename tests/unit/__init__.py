"""One-process tests (the fast tier, ``-m "not distributed"``)."""
