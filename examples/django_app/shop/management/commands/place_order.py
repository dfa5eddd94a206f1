from django.core.management.base import BaseCommand, CommandParser

from shop.orders import place_order


class Command(BaseCommand):
    help = "Place an order: the order row and its 'orders' event commit together."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("item")
        parser.add_argument("--quantity", type=int, default=1)

    def handle(self, *args: object, **options: object) -> None:
        order = place_order(str(options["item"]), int(str(options["quantity"])))
        self.stdout.write(f"order {order.id} placed")
