"""The sweep directory and its Parquet tables: the names of their columns, the one writer and the one reader,
and the failure policy's statuses. Imports no Ray."""
