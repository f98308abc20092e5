from django.urls import path

from notes import views

urlpatterns = [
    path("", views.index, name="index"),
    path("notes/", views.add_note, name="add_note"),
    path("results/<str:result_id>/", views.result, name="result"),
]
