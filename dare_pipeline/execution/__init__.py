"""How a step executes on a device: eager, compiled, or compiled and replayed from CUDA graphs.

The model (what runs) and the reuse plugins (what is skipped) call down into this layer; it holds
no decoding logic of its own. Its settings, `ExecutionConfig`, are configuration
(`dare_pipeline.config`). lifecycle.py keeps the processes a command starts from outliving it and
turns SIGINT and SIGTERM into a clean end of the command."""
