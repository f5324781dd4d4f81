"""One experiment from a YAML file: config, data, models, evaluation, run."""
