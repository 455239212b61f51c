"""The ``vllm-umim`` command line, the package's only argparse code: one module per subcommand
(``register(subparsers)`` adds its flags, ``run(args)`` runs it), ``main.py`` builds the parser from
them, ``config_args.py`` turns config dataclass fields into flags."""
