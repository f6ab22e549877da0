"""A run's pieces above checkpoint I/O: the model, optimizer and schedule built from a config (:mod:`.factories`),
a model rebuilt from any checkpoint (:mod:`.restore`), fuse + verify + export (:mod:`.fusing`)."""
