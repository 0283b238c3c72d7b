"""The plugin-author kit: the shipped plugin contract (`checks`, run by `pytest --dare-plugin NAME`
or `dare-pipeline plugins test NAME`) and the package skeleton of `dare-pipeline plugins new NAME`."""
