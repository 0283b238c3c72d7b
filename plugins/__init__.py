"""Built-in plugins of dare-pipeline, one per file; registered through the `dare_pipeline` entry-point group."""
