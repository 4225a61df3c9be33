"""Model families (network code only: no files, data or tasks). Each package registers itself in :mod:`megaray.families`."""
