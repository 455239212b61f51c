"""The ``vllm-umim`` command line: one ``cmd_<name>`` per subcommand in ``main.py``."""
