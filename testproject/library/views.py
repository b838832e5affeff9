from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.html import format_html, format_html_join
from django.views.decorators.csrf import csrf_exempt

from .models import Book, Order


def _book_json(book: Book) -> dict[str, Any]:
    return {
        "id": book.pk,
        "title": book.title,
        "author": book.author.name,
        "price": str(book.price),
        "stock": book.stock,
    }


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def book_list(request: HttpRequest) -> JsonResponse:
    books = Book.objects.select_related("author").order_by("pk")[:20]
    return JsonResponse({"books": [_book_json(book) for book in books]})


def book_page(request: HttpRequest) -> HttpResponse:
    """The books as an HTML page (where django-debug-toolbar shows itself)."""
    books = Book.objects.select_related("author").order_by("pk")[:20]
    items = format_html_join(
        "\n", "<li>{} by {}</li>", ((book.title, book.author.name) for book in books)
    )
    return HttpResponse(
        format_html(
            "<!DOCTYPE html><html><head><title>Books</title></head>"
            "<body><h1>Books</h1><ul>{}</ul></body></html>",
            items,
        )
    )


def book_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """One primary-key read."""
    book = Book.objects.select_related("author").get(pk=pk)
    return JsonResponse(_book_json(book))


@csrf_exempt
def buy_book(request: HttpRequest, pk: int) -> JsonResponse:
    """A transaction: a read, an update and an insert."""
    with transaction.atomic():
        book = Book.objects.select_related("author").get(pk=pk)
        Book.objects.filter(pk=pk).update(stock=F("stock") - 1)
        order = Order.objects.create(book=book, quantity=1)
    return JsonResponse({"order": order.pk, "book": book.pk, "stock": book.stock - 1})


async def async_book_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """An async view using the async ORM (Django runs it in its thread-sensitive executor)."""
    book = await Book.objects.select_related("author").aget(pk=pk)
    return JsonResponse(_book_json(book))


def _read_book_and_pid(pk: int) -> dict[str, Any]:
    book = Book.objects.select_related("author").get(pk=pk)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    return {**_book_json(book), "backend_pid": pid}


async def async_book_detail_in_thread(request: HttpRequest, pk: int) -> JsonResponse:
    """An async view reaching the ORM from a worker thread (thread_sensitive=False)."""
    return JsonResponse(await sync_to_async(_read_book_and_pid, thread_sensitive=False)(pk))


async def async_catalogue(request: HttpRequest) -> JsonResponse:
    """The async ORM's other ways in: a count, and async iteration over a queryset."""
    count = await Book.objects.acount()
    titles = [book.title async for book in Book.objects.order_by("pk")[:20]]
    return JsonResponse({"count": count, "titles": titles})


def session_info(request: HttpRequest) -> JsonResponse:
    """What the connection serving this request is: backend pid, database, time zone."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), current_database(), current_setting('TimeZone'), "
            "current_setting('application_name')"
        )
        pid, database, time_zone, application_name = cursor.fetchone()
    return JsonResponse(
        {
            "backend_pid": pid,
            "database": database,
            "time_zone": time_zone,
            "application_name": application_name,
        }
    )
