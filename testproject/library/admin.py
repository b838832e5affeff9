from django.contrib import admin

from .models import Author, Book, Order


@admin.register(Author)
class AuthorAdmin(admin.ModelAdmin):
    search_fields = ["name"]


@admin.register(Book)
class BookAdmin(admin.ModelAdmin):
    list_display = ["title", "author", "price", "stock"]
    list_select_related = ["author"]


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["book", "quantity", "created_at"]
