"""The sweep orchestrator, in layers that import only downward:

    sweepfile the sweep file: sections, loading, rules, expansion, overrides (no Ray)
    store     the sweep directory and its two Parquet tables: the one writer and the one reader (no Ray)
    run       the Ray Tune glue: trainable, schedulers, storage preflight, tracking callbacks, live view
    analysis  leaderboard, statistics, formats, report: reads the store only (no Ray)
    workflow  what a command does end to end: sweep, train one trial, estimate
    cli       thin: parse, call one workflow, print
"""
