<?php
// Handler of the function runtime tests: the event's "action" picks what
// it does.

return function ($event, $context) {
    switch ($event['action'] ?? 'echo') {
        case 'echo':
            echo "handler output goes to the log\n";
            fwrite(STDERR, "handler stderr goes to the log\n");
            return [
                'event' => $event,
                'context' => $context,
                'remainingTimeInMillis' => $context->getRemainingTimeInMillis(),
                'traceEnv' => getenv('_X_AMZN_TRACE_ID'),
                'autoloaded' => defined('TEST_AUTOLOADED'),
                'pid' => getmypid(),
            ];
        case 'pid':
            return getmypid();
        case 'throw':
            throw new DomainException('the handler failed on purpose');
        case 'memory':
            ini_set('memory_limit', '32M');
            $blocks = [];
            while (true) {
                $blocks[] = str_repeat('x', 1 << 20);
            }
        case 'exit':
            exit(0);
        case 'large':
            // 6 MB of text: with its quotes the JSON is 2 bytes over.
            return str_repeat('x', 6291456);
        case 'invalid-utf8':
            return ['items' => ['fine', "\xff\xfe"]];
        case 'nan':
            return NAN;
    }
    throw new InvalidArgumentException('unknown action');
};
