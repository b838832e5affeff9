from argparse import ArgumentParser
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from testproject.library.models import Author, Book


class Command(BaseCommand):
    help = "Fill the library with authors and books (idempotent)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--books", type=int, default=1000)

    def handle(self, *args: Any, **options: Any) -> None:
        wanted = options["books"]
        existing = Book.objects.count()
        if existing >= wanted:
            if options["verbosity"]:
                self.stdout.write(f"{existing} books already there")
            return
        with transaction.atomic():
            authors = Author.objects.bulk_create(
                Author(name=f"Author {n}") for n in range(max(1, wanted // 10))
            )
            Book.objects.bulk_create(
                Book(
                    author=authors[n % len(authors)],
                    title=f"Book {n}",
                    price=Decimal("9.99") + n % 50,
                    stock=1_000_000,
                )
                for n in range(existing, wanted)
            )
        if options["verbosity"]:
            self.stdout.write(f"seeded {wanted - existing} books")
