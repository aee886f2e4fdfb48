"""cmmerge: adapt multilingual models to code-mixed tasks by CPT, task vectors and model merging."""

__version__ = "0.1.0"
