"""Input pipelines: sources.py picks the records, images.py decodes them, pipeline.py streams them.

The settings are read once: `spec.DataSpec.from_config(config.data)` (defaults for older
configs, value checks, unknown keys refused; the keys are listed in spec.py). Every data
function takes that spec. Start with `sources.check_data(data)` (fails fast on data that
cannot train), then `pipeline.train_iterator` (endless, checkpointable) and
`pipeline.eval_batches` (one padded, masked pass).
"""
