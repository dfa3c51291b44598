"""The Ray Tune glue: the trainable, the schedulers and their rungs, the storage preflight, tracking callbacks
and the live view. Modules that need Ray import it themselves; `rungs` and `devices` stay Ray-free."""
