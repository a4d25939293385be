"""Typed YAML inputs: workflow specs, model and GPU catalogs, cluster specs and plan files."""
