<?php
// A handler object with a handle() method instead of a callable.

return new class {
    public function handle($event, $context): array
    {
        return ['handled' => $event, 'requestId' => $context->getAwsRequestId()];
    }
};
