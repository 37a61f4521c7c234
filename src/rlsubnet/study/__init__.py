"""The paper's experiments as pipelines (RQ1-RQ5), each producing result objects."""
