"""Input pipelines: sources.py picks the records, images.py decodes them, pipeline.py streams them.

Start with `sources.check_data(config.data)` (fails fast on a config that cannot train),
then `pipeline.train_iterator` (endless, checkpointable) and `pipeline.eval_batches`
(one padded, masked pass). The config keys are listed in sources.py and pipeline.py.
"""
