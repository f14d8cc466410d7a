from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0010_ingest_job_pace'),
    ]

    operations = [
        migrations.AddField(
            model_name='modelversion',
            name='precision',
            field=models.JSONField(blank=True, default=dict, help_text="per machine kind: the precision chosen by the catalog's evaluation, with its figures (catalog/precision_choice.py)"),
        ),
    ]
