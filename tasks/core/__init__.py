"""The machinery every stage stands on: the dataset store, the Parquet schemas, the
config's shared sections and loading, the `Stage` record, shards, sharing."""
