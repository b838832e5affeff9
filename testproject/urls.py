from django.conf import settings
from django.contrib import admin
from django.urls import path

from testproject import metrics
from testproject.library import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/", views.health),
    path("books/", views.book_list),
    path("books/page/", views.book_page),
    path("books/<int:pk>/", views.book_detail),
    path("books/<int:pk>/buy/", views.buy_book),
    path("async/books/", views.async_catalogue),
    path("async/books/<int:pk>/", views.async_book_detail),
    path("async/books/<int:pk>/thread/", views.async_book_detail_in_thread),
    path("db/session/", views.session_info),
    path("metrics", metrics.metrics),
]

if settings.DEBUG and "debug_toolbar" in settings.INSTALLED_APPS:
    from debug_toolbar.toolbar import debug_toolbar_urls
    from django.contrib.staticfiles.urls import staticfiles_urlpatterns

    urlpatterns += [*debug_toolbar_urls(), *staticfiles_urlpatterns()]
