"""The config layer: the only code (with cli.py and the commands) that reads the composed Hydra
config. It turns a command's config into typed specs and jobs for the stages."""
