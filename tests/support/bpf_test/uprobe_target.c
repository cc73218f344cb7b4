/* Target of the uprobe test: kspan_target() is called argv[1] times with 1000, 1001, ... */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int kspan_target(int x)
{
	__asm__ volatile("" ::: "memory");
	return x * 2 + 1;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 1;
	long sum = 0;

	for (int i = 0; i < n; i++)
		sum += kspan_target(1000 + i);
	printf("%ld\n", sum);
	return 0;
}
