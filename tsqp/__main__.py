try:
    from tsqp.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch still imports: no traceback
    raise SystemExit(130) from None

raise SystemExit(main())
