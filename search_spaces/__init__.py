"""The shipped search-space YAML files (installed as ``tune_pets.search_spaces``)."""
