"""Every-site benchmark (bench_every_site.py); a package for import-linter only."""
