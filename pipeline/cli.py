from __future__ import annotations
import click
@click.group()
@click.version_option(package_name="norm-pipeline")
def main() -> None:
    """norm-pipeline"""
