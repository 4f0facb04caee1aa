"""ppd_train: trains early-exit heads. Depends on ppd_decode (model loading, head format), never the reverse."""
